"""A third-party attack: FGSM, one signed-gradient step (l_inf)."""

from typing import Any

import torch
import torch.nn.functional as F

from harness.api import Attack, Target, ThreatModel, project


class FGSM(Attack):
    """One step of ``scale * eps`` along the sign of the loss gradient."""

    name = "fgsm"
    summary = "FGSM, l_inf, one signed-gradient step of scale * eps: fgsm[:scale=S]"
    paper = "Goodfellow, Shlens & Szegedy, ICLR 2015"

    def __init__(self, threat: ThreatModel, scale: float = 1.0):
        super().__init__(threat)
        if threat.norm != "linf" or not 0 < scale <= 1:
            raise ValueError("FGSM needs the linf threat and 0 < scale <= 1")
        self.scale = float(scale)

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "norm": self.threat.norm, "scale": self.scale}

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
                seed: int) -> torch.Tensor:
        x_var = x.detach().requires_grad_(True)
        loss = F.cross_entropy(target(x_var, indices).float(), y, reduction="sum")
        grad = torch.autograd.grad(loss, x_var)[0]
        step = self.scale * self.threat.eps.value
        return project(x.detach() + step * grad.sign(), x.detach(), self.threat)

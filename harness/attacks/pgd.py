"""Projected gradient descent (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018), l_inf and l_2, with random start and expectation over transformation (EOT,
Athalye et al., ICML 2018) for stochastic targets.

Each sample keeps the first iterate on which the target misclassified it (AutoAttack's bookkeeping):
with a fixed step size, the iterates of a longer run extend those of a shorter one, so more steps can
never help the defender.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.attacks.base import Attack, Target, project
from harness.core.noise import FixedNoise
from harness.core.threat import ThreatModel


class PGD(Attack):
    name = "pgd"

    def __init__(self, threat: ThreatModel, steps: int = 20, step_size: float | None = None,
                 random_start: bool = True, eot: int = 1):
        super().__init__(threat)
        if steps < 0 or eot < 1:
            raise ValueError("PGD needs steps >= 0 and eot >= 1")
        self.steps = int(steps)
        # a fixed fraction of eps, independent of the number of steps (keeps runs nested)
        self.step_size = float(step_size) if step_size is not None else threat.eps.value / 4
        self.random_start = random_start
        self.eot = int(eot)

    def params(self):
        return {"name": self.name, "norm": self.threat.norm, "steps": self.steps,
                "step_size": self.step_size, "random_start": self.random_start, "eot": self.eot}

    def label(self) -> str:
        suffix = f"xEOT{self.eot}" if self.eot > 1 else ""
        return f"PGD-{self.steps}{suffix}"

    def _start(self, x: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
        if not self.random_start or self.threat.eps.value == 0:
            return x.clone()
        draws = FixedNoise(seed, namespace="pgd-start").draws(indices)
        eps = self.threat.eps.value
        if self.threat.norm == "linf":
            delta = (2 * draws.rand(x.shape[1:]) - 1) * eps
        else:
            direction = draws.randn(x.shape[1:])
            direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            radius = draws.rand((1, 1, 1)) * eps
            delta = direction * radius
        return project(x + delta.to(x), x, self.threat)

    def _gradient(self, target: Target, x_adv: torch.Tensor, y: torch.Tensor,
                  indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean gradient of the summed cross-entropy over ``eot`` calls, and the first call's logits."""
        grad = torch.zeros_like(x_adv)
        first_logits = None
        for _ in range(self.eot):
            x_var = x_adv.detach().requires_grad_(True)
            logits = target(x_var, indices)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            grad += torch.autograd.grad(loss, x_var)[0]
            if first_logits is None:
                first_logits = logits.detach()
        return grad / self.eot, first_logits

    def _step(self, x_adv: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if self.threat.norm == "linf":
            return x_adv + self.step_size * grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
        return x_adv + self.step_size * grad / norms

    def perturb(self, target, x, y, indices, seed):
        x = x.detach()
        x_adv = self._start(x, indices, seed)
        best = x_adv.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            grad, logits = self._gradient(target, x_adv, y, indices)
            newly = (logits.argmax(1) != y) & ~fooled
            best[newly] = x_adv[newly]
            fooled |= newly
            x_adv = project(self._step(x_adv, grad), x, self.threat).detach()
        best[~fooled] = x_adv[~fooled]  # never fooled on the way: the final iterate
        return best

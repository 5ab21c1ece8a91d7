"""Projected gradient descent (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018), l_inf and l_2, with random start and expectation over transformation (EOT,
Athalye et al., ICML 2018) for stochastic targets, on the cross-entropy or the CW margin loss (``loss=margin``,
Carlini & Wagner, S&P 2017), with ``restarts`` random starts for the points still standing.

Each sample keeps the first iterate on which the target misclassified it (AutoAttack's bookkeeping):
with a fixed step size, the iterates of a longer run extend those of a shorter one, so more steps can
never help the defender.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

from harness.attacks.base import Attack, Target, project
from harness.core.noise import FixedNoise
from harness.core.passes import gradient_free
from harness.core.registry import suggest
from harness.core.threat import ThreatModel


def _whole(name: str, value: Any, least: int) -> int:
    """``value`` if it is a whole number >= ``least``, else a ValueError saying so."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")
    return value


def _positive(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0, else a ValueError saying so."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < sys.float_info.max:
        return float(value)
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


class PGD(Attack):
    name = "pgd"

    def __init__(self, threat: ThreatModel, steps: int = 20, step_size: float | None = None,
                 random_start: bool = True, eot: int = 1, loss: str = "ce", restarts: int = 1):
        super().__init__(threat)
        self.steps = _whole("steps", steps, 0)
        self.eot = _whole("eot", eot, 1)
        self.restarts = _whole("restarts", restarts, 1)
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}{suggest(str(loss), LOSSES)}; valid: {', '.join(LOSSES)}")
        self.loss = loss
        #: per sample, the step at which the last :meth:`perturb` first fooled the target (-1: never)
        self.fooled_at: torch.Tensor | None = None
        if not isinstance(random_start, bool):
            raise ValueError(f"random_start must be true or false, got {random_start!r}")
        self.random_start = random_start
        # a fixed fraction of eps, independent of the number of steps (keeps runs nested)
        self.step_size = threat.eps.value / 4 if step_size is None else _positive("step_size", step_size)

    def params(self):
        params = {"name": self.name, "norm": self.threat.norm, "steps": self.steps,
                  "step_size": self.step_size, "random_start": self.random_start, "eot": self.eot}
        if self.loss != "ce":  # the defaults stay implicit, so cells stored before these options keep their keys
            params["loss"] = self.loss
        if self.restarts != 1:
            params["restarts"] = self.restarts
        return params

    def label(self) -> str:
        loss = "" if self.loss == "ce" else f"-{self.loss}"
        restarts = f"x{self.restarts}R" if self.restarts > 1 else ""
        eot = f"xEOT{self.eot}" if self.eot > 1 else ""
        return f"PGD-{self.steps}{loss}{restarts}{eot}"

    def _start(self, x: torch.Tensor, indices: torch.Tensor, seed: int, restart: int = 0) -> torch.Tensor:
        if not self.random_start or self.threat.eps.value == 0:
            return x.clone()
        namespace = "pgd-start" if restart == 0 else f"pgd-start-{restart}"
        draws = FixedNoise(seed, namespace=namespace).draws(indices)
        eps = self.threat.eps.value
        if self.threat.norm == "linf":
            delta = (2 * draws.rand(x.shape[1:], device=x.device) - 1) * eps
        else:
            direction = draws.randn(x.shape[1:], device=x.device)
            direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            radius = draws.rand((1, 1, 1), device=x.device) * eps
            delta = direction * radius
        return project(x + delta.to(x), x, self.threat)

    def _gradient(self, target: Target, x_adv: torch.Tensor, y: torch.Tensor,
                  indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean gradient of the summed loss over ``eot`` calls, and the first call's logits."""
        grad = torch.zeros_like(x_adv)
        first_logits = None
        for _ in range(self.eot):
            x_var = x_adv.detach().requires_grad_(True)
            logits = target(x_var, indices)
            grad += torch.autograd.grad(LOSSES[self.loss](logits.float(), y), x_var)[0]
            if first_logits is None:
                first_logits = logits.detach()
        return grad / self.eot, first_logits

    def _step(self, x_adv: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if self.threat.norm == "linf":
            return x_adv + self.step_size * grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
        return x_adv + self.step_size * grad / norms

    def _run(self, target: Target, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, seed: int,
             restart: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One restart: the first fooling iterate of each sample (else the final one), and the step it
        fooled at (-1: not within the steps)."""
        x_adv = self._start(x, indices, seed, restart)
        best = x_adv.clone()
        fooled_at = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
        for step in range(self.steps):
            grad, logits = self._gradient(target, x_adv, y, indices)
            newly = (logits.argmax(1) != y) & (fooled_at < 0)
            best[newly] = x_adv[newly]
            fooled_at[newly] = step
            x_adv = project(self._step(x_adv, grad), x, self.threat).detach()
        best[fooled_at < 0] = x_adv[fooled_at < 0]  # never fooled on the way: the final iterate
        return best, fooled_at

    def perturb(self, target, x, y, indices, seed):
        x = x.detach()
        best, fooled_at = self._run(target, x, y, indices, seed, 0)
        for restart in range(1, self.restarts):  # a new random start for the points still standing
            pending = fooled_at < 0
            if not pending.any():  # every point fell on the way: nothing to check or restart
                break
            with gradient_free(target):
                standing = (target(best, indices).argmax(1) == y) & pending
            if not standing.any():
                break
            rows = standing.nonzero().squeeze(1)
            again, at = self._run(target, x[rows], y[rows], indices[rows], seed, restart)
            best[rows] = again
            fooled_at[rows] = torch.where(at >= 0, at + restart * self.steps, at)
        self.fooled_at = fooled_at
        return best


def _margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The CW margin (Carlini & Wagner, S&P 2017), summed: the best wrong logit minus the true one. It
    does not saturate on very confident points, where cross-entropy's gradient vanishes."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (wrong - true).sum()


def _ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


#: the losses PGD ascends, by option value
LOSSES = {"ce": _ce_loss, "margin": _margin_loss}

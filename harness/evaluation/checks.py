"""Evaluation-quality checks run on a cell's first batch, after AutoAttack's ``checks.py`` (Croce &
Hein, ICML 2020) and going beyond it. Each check returns a :class:`Flag` when it fires; the runner
stores them with the cell (``cell.metrics["flags"]``) and the leaderboard marks a row that has any as
potentially unreliable.

* ``randomness``: two forward passes with the same fixed noise disagree, so the defense draws randomness
  that is not its ``noise`` argument (the fixed-randomness protocol then does not fix it), or an entry
  declared ``stochastic=False`` is random;
* ``probabilities``: the outputs look like probabilities (in [0, 1], rows summing to 1) instead of logits,
  which flattens cross-entropy gradients;
* ``vanishing-gradients``: the input gradient of the attack's target is zero or vanishing on a share of
  points (gradient masking): try ``bpda`` or a black-box attack (``square``);
* ``dynamic``: the defense computes gradients during its forward pass (test-time optimisation), which a
  fixed number of attack steps may not see through.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.attacks.base import Target
from harness.core.passes import counting_gradients

__all__ = ["Flag", "FLAG_HELP", "batch_flags", "GRADIENT_FLOOR", "VANISHING_SHARE"]

#: a point's input gradient counts as vanishing below this l1 norm
GRADIENT_FLOOR = 1e-12
#: the share of clean-correct points with vanishing gradients that raises the flag
VANISHING_SHARE = 0.1
_SAME = 1e-5  # tolerance of "the same output" (relative, on l2-normalised logits)

FLAG_HELP = {
    "randomness": "repeated forward passes with the same fixed noise disagree: the defense has randomness "
                  "outside its noise argument, or is random although declared deterministic",
    "probabilities": "outputs look like probabilities, not logits: cross-entropy gradients are flattened",
    "vanishing-gradients": "input gradients are zero or vanishing on many points (gradient masking?): "
                           "try the bpda protocol or a black-box attack (square, transfer)",
    "dynamic": "the defense computes gradients in its forward pass (test-time optimisation): a fixed "
               "attack budget may not see through it",
}


@dataclass(frozen=True)
class Flag:
    """A check that fired on a cell: its name, why, and how strongly (a share of points, or 1)."""

    name: str
    detail: str
    share: float = 1.0

    def describe(self) -> dict[str, Any]:
        return asdict(self)


Forward = Callable[[torch.Tensor], torch.Tensor]


def _normalised(logits: torch.Tensor) -> torch.Tensor:
    return logits / logits.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1)


def _randomness(forward: Forward, x: torch.Tensor) -> Flag | None:
    with torch.no_grad():
        first, second = forward(x), forward(x)
    differ = (_normalised(first) - _normalised(second)).norm(dim=1) > _SAME
    if differ.any():
        return Flag("randomness", f"{int(differ.sum())} of {len(x)} outputs changed between two identical calls",
                    float(differ.float().mean()))
    return None


def _probabilities(logits: torch.Tensor) -> Flag | None:
    if len(logits) and logits.min() > -1e-5 and logits.max() < 1 + 1e-5 and \
            bool(((logits.sum(1) - 1).abs() < 1e-5).all()):
        return Flag("probabilities", "every output row is in [0, 1] and sums to 1")
    return None


def _vanishing(target: Target, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> Flag | None:
    x_var = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = target(x_var, indices)
        if not logits.requires_grad:
            return Flag("vanishing-gradients", "the attack's target returns no gradient at all")
        grad, = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), x_var,
                                    allow_unused=True)
    if grad is None:
        return Flag("vanishing-gradients", "the input does not reach the attack's target's output")
    small = grad.flatten(1).abs().sum(1) < GRADIENT_FLOOR
    share = float(small.float().mean())
    if share >= VANISHING_SHARE:
        return Flag("vanishing-gradients", f"{int(small.sum())} of {len(x)} points have a zero or vanishing "
                                           f"input gradient", share)
    return None


def _dynamic(forward: Forward, x: torch.Tensor) -> Flag | None:
    with counting_gradients() as calls, torch.no_grad():
        forward(x)
    if calls[0]:
        return Flag("dynamic", f"{calls[0]} gradient computation(s) in one forward pass of {len(x)} images")
    return None


def batch_flags(forward: Forward, target: Target, x: torch.Tensor, y: torch.Tensor,
                indices: torch.Tensor) -> list[Flag]:
    """The flags of one batch: ``forward`` is the defense as evaluated (fixed noise of the cell),
    ``target`` what the attack differentiates. Points the defense misclassifies are left out of the
    gradient check (they are not attacked)."""
    with torch.no_grad():
        logits = forward(x)
    flags = [_randomness(forward, x), _probabilities(logits), _dynamic(forward, x)]
    correct = logits.argmax(1) == y
    if correct.any():
        flags.append(_vanishing(target, x[correct], y[correct], indices[correct]))
    return [f for f in flags if f is not None]

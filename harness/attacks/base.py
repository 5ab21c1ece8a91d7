"""What an attack sees: a target model called on images together with their dataset indices."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch

from harness.core.threat import ThreatModel

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Target:
    """The function an attack differentiates: ``logits = fn(x, indices)``.

    ``indices`` are the dataset positions of the rows of ``x``; a model with fixed per-sample
    randomness needs them (``index_dependent``), a deterministic one ignores them.
    """

    fn: ModelFn
    index_dependent: bool = False

    def __call__(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.fn(x, indices)


class Attack(ABC):
    """An attack within a threat model; ``params()`` is stored in the cell and its key."""

    name: str

    def __init__(self, threat: ThreatModel):
        self.threat = threat

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Everything that changes the attack's result (besides the seed)."""

    @abstractmethod
    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
                seed: int) -> torch.Tensor:
        """Adversarial images for ``x`` (in [0, 1], within the threat model)."""

    def label(self) -> str:
        """Short human label for reports, e.g. ``PGD-20``."""
        return self.name


def project(x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """Project ``x_adv`` onto the threat-model ball around ``x`` intersected with [0, 1]."""
    delta = x_adv - x
    eps = threat.eps.value
    if threat.norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = (eps / norms).clamp(max=1.0)
        delta = delta * factor.view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0)


def perturbation_norm(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample l_inf or l_2 norm of ``x_adv - x``."""
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)

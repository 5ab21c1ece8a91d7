"""Guards on what a defense and an attack return: a wrong shape, non-finite logits or an adversarial
image outside the threat model raise, so the cell fails instead of storing garbage as predictions."""

from __future__ import annotations

from typing import Any

import torch

from harness.core.entry import Defense
from harness.core.threat import ThreatModel

__all__ = ["check_batch", "CheckedDefense"]


def check_batch(x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel, norms: torch.Tensor) -> None:
    """Every adversarial image must lie within eps of its clean image and inside [0, 1]."""
    if x_adv.min() < 0 or x_adv.max() > 1 or bool((norms > threat.eps.value * (1 + 1e-5) + 1e-6).any()):
        raise RuntimeError(f"attack left the threat model ({threat.norm} eps {threat.eps}): "
                           f"max norm {norms.max():.6f}, range [{x_adv.min():.4f}, {x_adv.max():.4f}]")


class CheckedDefense(Defense):
    """``defense`` with its outputs checked on every call: purified images of the input's shape, and
    finite logits of shape (batch, classes of the dataset). Anything else raises, so it fails the cell
    instead of being stored as (class-0) predictions."""

    def __init__(self, defense: Defense, num_classes: int):
        super().__init__(defense.classifier, defense.purifier)
        self.num_classes = num_classes
        self.train(defense.training)

    def purify(self, x: torch.Tensor, noise: Any) -> torch.Tensor:
        purified = super().purify(x, noise)
        if tuple(purified.shape) != tuple(x.shape):
            raise ValueError(f"the purifier returned images of shape {tuple(purified.shape)} for inputs of "
                             f"shape {tuple(x.shape)}")
        return purified

    def forward(self, x: torch.Tensor, noise: Any) -> torch.Tensor:
        logits = super().forward(x, noise)
        if tuple(logits.shape) != (len(x), self.num_classes):
            raise ValueError(f"the defense returned logits of shape {tuple(logits.shape)}, expected "
                             f"({len(x)}, {self.num_classes})")
        finite = torch.isfinite(logits)
        if not bool(finite.all()):
            raise ValueError(f"the defense returned non-finite logits ({int((~finite).sum())} of "
                             f"{logits.numel()} values are NaN or inf)")
        return logits

"""Defense transfer: a purifier trained on dataset A in front of a classifier of dataset B.

The MAEP paper (Tables 7-9) trains a purifier on one dataset and evaluates it, unchanged, with the
classifier of another. Images of B are mapped to A's shape before purification and back afterwards
(:class:`ShapeAdapter`); both maps are differentiable, so adaptive attacks see exact gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from harness.core.noise import NoiseDraws
from harness.core.entry import Purifier

__all__ = ["LUMA_WEIGHTS", "ShapeAdapter", "match_channels", "resize"]

#: ITU-R BT.601 luma weights: the grey level of an RGB image (as PIL's ``convert("L")``).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``x`` with ``channels`` channels: grey -> RGB repeats the grey level, RGB -> grey takes luma."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1:
        return x.expand(-1, channels, -1, -1)
    if have == 3 and channels == 1:
        weights = x.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot map {have}-channel images to {channels} channels (only 1 <-> 3)")


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize to ``size`` (H, W); antialiased when shrinking, identity when the size matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


class ShapeAdapter(Purifier):
    """Runs ``inner`` (built for images of ``inner_shape``) on images of ``outer_shape``.

    ``outer -> inner``: channels (repeat grey / take luma), then bilinear resize; the purified image
    takes the reverse path and is clipped to [0, 1]. Randomness is the inner purifier's own: it draws
    from the same :class:`~harness.core.noise.NoiseDraws`, in the inner shape.
    """

    def __init__(self, inner: Purifier, inner_shape: tuple[int, int, int], outer_shape: tuple[int, int, int]):
        super().__init__()
        for shape in (inner_shape, outer_shape):
            if shape[0] not in (1, 3):
                raise ValueError(f"only 1- and 3-channel images can be adapted, got shape {shape}")
        self.inner = inner
        self.inner_shape, self.outer_shape = tuple(inner_shape), tuple(outer_shape)
        self.provenance: dict[str, Any] = {
            "inner": getattr(inner, "provenance", None),
            "adapter": {"inner_shape": list(self.inner_shape), "outer_shape": list(self.outer_shape),
                        "channels": "repeat grey / BT.601 luma", "resize": "bilinear (antialiased down)"},
        }

    def forward(self, x: torch.Tensor, noise: NoiseDraws) -> torch.Tensor:
        c, h, w = self.inner_shape
        inner_x = resize(match_channels(x, c), (h, w))
        purified = self.inner(inner_x, noise)
        outer_c, outer_h, outer_w = self.outer_shape
        return resize(match_channels(purified, outer_c), (outer_h, outer_w)).clamp(0, 1)

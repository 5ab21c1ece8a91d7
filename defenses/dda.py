"""``dda``: diffuse part-way, then reverse with low-pass guidance toward the input.

Gao, Zhang, Liu, Darrell, Shelhamer, Wang, "Back to the Source: Diffusion-Driven Adaptation to
Test-Time Corruption", CVPR 2023. Each reverse step is pulled toward the input y through the
low-frequency distance between ``phi(y)`` and ``phi(x0_hat)``, with ``phi`` a low-pass filter (down-
then up-sampling by ``D``). DDA was designed for corruptions; it is known to fail adversarially.

Option ``guidance`` (stored in the cell):

* ``x0`` (default) [reconstructed]: the x0-space step ``x0_hat -= scale * phi(x0_hat - y)`` of
  :mod:`harness.toolkit.diffusion.sampler`, the gradient of ``L = scale/2 ||phi(x0_hat - y)||^2``. With
  ``scale = 1`` it replaces the low frequencies of the prediction by those of the input, as ILVR
  (Choi et al., ICCV 2021) does. Cheap: no gradient through the UNet.
* ``unet`` (the paper's way): the same ``L`` differentiated with respect to ``x_t`` through the UNet
  (``x_{t-1} -= sqrt(a_t a_{t-1}) grad_{x_t} L``); exact attack gradients then need second-order
  terms through every UNet call (``create_graph`` only when the input requires grad).

[reconstructed] in both modes: ``phi`` is average pooling then nearest upsampling (a symmetric
projection; the code uses a bicubic resizer); ``L`` is per image and squared (the code takes the
unsquared norm over the whole batch, which would couple images, with a fixed step ``scale``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.api import (DefenseEntry, Kind, Metadata, ReversePurifier, diffusion_options, entry_build,
                        train_entry_ddpm)


def low_pass(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool by ``factor`` then upsample back (a symmetric projection)."""
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")


class DDA(ReversePurifier):
    """DiffPure's sampler plus DDA's low-frequency guidance."""

    guided = True

    def __init__(self, loaded, *, scale: float, D: int, **kwargs):
        super().__init__(loaded, scale=float(scale), D=int(D), **kwargs)
        self.scale, self.factor = float(scale), int(D)

    def guide_loss(self, x0: torch.Tensor, t: int, ref: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.scale * low_pass(x0 - ref, self.factor).pow(2).flatten(1).sum(1)

    def guide(self, x0: torch.Tensor, t: int, ref: torch.Tensor) -> torch.Tensor:
        return self.scale * low_pass(x0 - ref, self.factor)


_SETTINGS = ("tstar", "steps", "scale", "D", "guidance")

DDA_ENTRY = DefenseEntry(
    name="dda",
    version="1",
    kind=Kind.PURIFIER,
    paper="Back to the Source: Diffusion-Driven Adaptation to Test-Time Corruption",
    citation="Gao, Zhang, Liu, Darrell, Shelhamer, Wang. CVPR 2023. arXiv 2207.03442",
    build=entry_build(DDA, _SETTINGS),
    options=diffusion_options(_SETTINGS),
    metadata=Metadata(architecture="DDPM UNet purifier + base classifier", nfe=11, venue="CVPR", year=2023,
                      code_url="https://github.com/shiyegao/DDA"),
    stochastic=True,
    differentiable=True,
    presets={
        "small": {"ddpm": "small", "tstar": 0.5, "steps": 10, "scale": 1.0, "D": 4, "sampler": "ddpm",
                  "guidance": "x0"},
        "paper": {"ddpm": "paper", "tstar": 0.5, "steps": 50, "scale": 1.0, "D": 4, "sampler": "ddpm",
                  "guidance": "x0"},
        "tiny": {"ddpm": "tiny", "tstar": 0.5, "steps": 3, "scale": 1.0, "D": 4, "sampler": "ddpm",
                 "guidance": "x0"},
    },
    train=train_entry_ddpm,
    reported=(),
    description="Partial diffusion with low-pass guidance toward the input (a corruption method).",
)

"""``mimicdiffusion``: sample from pure noise, guided toward the input by an L1 distance.

Song, Lai, Pan, Yin, "MimicDiffusion: Purifying Adversarial Perturbation via Mimicking Clean
Diffusion Model", arXiv 2312.04802 (2023). The reverse process starts at t = T from pure Gaussian
noise and every step is pulled toward the input y by the gradient of the Manhattan distance
``L = scale * sum |x0_hat - y|``, so the adversarial perturbation reaches the sample only through that
guidance.

Option ``guidance`` (stored in the cell):

* ``x0`` (default) [reconstructed]: the x0-space step ``x0_hat -= grad_{x0} L`` of
  :mod:`harness.toolkit.diffusion.sampler`. Cheap: no gradient through the UNet.
* ``unet`` (the paper's equations): ``L`` differentiated with respect to ``x_t`` through the UNet
  (``x_{t-1} -= sqrt(a_t a_{t-1}) grad_{x_t} L``); exact attack gradients then need second-order
  terms through every UNet call (``create_graph`` only when the input requires grad). The released
  code computes eps before enabling gradients, so its gradient skips the UNet and equals ``x0``
  guidance up to the step weight (it weights by ``rho * sqrt(a_t)``).

[reconstructed] One L1 guidance term (the paper combines long- and short-range ones); ``|u|`` is
smoothed to ``sqrt(u^2 + delta^2)`` (``delta`` option, 0.05 by default) because the exact L1 gradient
``sign(x0_hat - y)`` has zero derivative in y, which would mask gradients of any adaptive attack.
"""

from __future__ import annotations

import torch

from harness.api import (DefenseEntry, Kind, Metadata, ReversePurifier, diffusion_options, entry_build,
                        train_entry_ddpm)


class MimicDiffusion(ReversePurifier):
    """Reverse sampling from pure noise with smoothed-L1 guidance toward the input."""

    guided = True

    def __init__(self, loaded, *, scale: float, delta: float, steps: int, **kwargs):
        super().__init__(loaded, tstar=1.0, steps=steps, from_noise=True, scale=float(scale),
                         delta=float(delta), **kwargs)
        self.scale, self.delta = float(scale), float(delta)

    def guide_loss(self, x0: torch.Tensor, t: int, ref: torch.Tensor) -> torch.Tensor:
        return self.scale * ((x0 - ref).pow(2) + self.delta ** 2).sqrt().flatten(1).sum(1)

    def guide(self, x0: torch.Tensor, t: int, ref: torch.Tensor) -> torch.Tensor:
        diff = x0 - ref
        return self.scale * diff / (diff.pow(2) + self.delta ** 2).sqrt()


_SETTINGS = ("steps", "scale", "delta", "guidance")

MIMICDIFFUSION = DefenseEntry(
    name="mimicdiffusion",
    version="1",
    kind=Kind.PURIFIER,
    paper="MimicDiffusion: Purifying Adversarial Perturbation via Mimicking Clean Diffusion Model",
    citation="Song, Lai, Pan, Yin. arXiv 2312.04802 (2023)",
    build=entry_build(MimicDiffusion, _SETTINGS),
    options=diffusion_options(_SETTINGS),
    metadata=Metadata(architecture="DDPM UNet purifier + base classifier", nfe=21, venue="arXiv", year=2023),
    stochastic=True,
    differentiable=True,
    presets={
        "small": {"ddpm": "small", "steps": 20, "scale": 0.2, "delta": 0.05, "sampler": "ddim", "guidance": "x0"},
        "paper": {"ddpm": "paper", "steps": 100, "scale": 0.2, "delta": 0.05, "sampler": "ddim", "guidance": "x0"},
        "tiny": {"ddpm": "tiny", "steps": 3, "scale": 0.2, "delta": 0.05, "sampler": "ddim", "guidance": "x0"},
    },
    train=train_entry_ddpm,
    reported=(),
    description="Guided sampling from pure noise toward the input (L1 guidance).",
)

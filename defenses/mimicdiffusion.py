"""``mimicdiffusion``: sample from pure noise, guided toward the input by an L1 distance.

Song, Wang, Guo, Liu, Li, Gao, "MimicDiffusion: Purifying Adversarial Perturbation via Mimicking
Clean Diffusion Model", CVPR 2024. The reverse process starts at t = T from pure Gaussian noise and
every step is pulled toward the input y by the gradient of ``scale * ||x0_hat - y||_1`` (Manhattan
distance), so the adversarial perturbation reaches the sample only through that guidance.

[reconstructed] One L1 guidance term (the paper combines long- and short-range ones); ``|u|`` is
smoothed to ``sqrt(u^2 + delta^2)`` (``delta`` option, 0.05 by default) because the exact L1 gradient
``sign(x0_hat - y)`` has zero derivative in y, which would mask gradients of any adaptive attack; the
pull is the x0-space step ``x0_hat -= scale * grad L`` of :mod:`harness.diffusion.sampler` (the paper
steps x_t along a gradient through the UNet).
"""

from __future__ import annotations

from harness.diffusion.purifier import ReversePurifier, entry_build, train_entry_ddpm
from harness.registry import DefenseEntry, Kind


class MimicDiffusion(ReversePurifier):
    """Reverse sampling from pure noise with smoothed-L1 guidance toward the input."""

    guided = True

    def __init__(self, loaded, *, scale: float, delta: float, steps: int, **kwargs):
        super().__init__(loaded, tstar=1.0, steps=steps, from_noise=True, scale=float(scale),
                         delta=float(delta), **kwargs)
        self.scale, self.delta = float(scale), float(delta)

    def guide(self, x0, t, ref):
        diff = x0 - ref
        return self.scale * diff / (diff.pow(2) + self.delta ** 2).sqrt()


MIMICDIFFUSION = DefenseEntry(
    name="mimicdiffusion",
    version="1",
    kind=Kind.PURIFIER,
    paper="MimicDiffusion: Purifying Adversarial Perturbation via Mimicking Clean Diffusion Model "
          "(Song et al., CVPR 2024)",
    citation="Song, Wang, Guo, Liu, Li, Gao. CVPR 2024. arXiv 2312.04802",
    build=entry_build(MimicDiffusion, ("steps", "scale", "delta")),
    datasets=("cifar10", "cifar100"),
    stochastic=True,
    differentiable=True,
    presets={
        "small": {"ddpm": "small", "steps": 20, "scale": 0.2, "delta": 0.05, "sampler": "ddim"},
        "paper": {"ddpm": "paper", "steps": 100, "scale": 0.2, "delta": 0.05, "sampler": "ddim"},
        "tiny": {"ddpm": "tiny", "steps": 3, "scale": 0.2, "delta": 0.05, "sampler": "ddim"},
    },
    train=train_entry_ddpm,
    reported=(),
    description="Guided sampling from pure noise toward the input (L1 guidance).",
)

"""``scoreopt-o`` and ``scoreopt-n``: purify by optimising under a diffusion (score) prior.

Zhang, Wang, Zhou, Chen, Lu, "Enhancing Adversarial Robustness via Score-Based Optimization",
NeurIPS 2023. Instead of sampling, the input is refined by minimising the denoising loss
``||D(v + sigma * eps, sigma) - v||^2`` (``D`` the one-step denoiser of the DDPM at noise level t*):

* ``scoreopt-o`` optimises the image v with a fresh eps every iteration and outputs v;
* ``scoreopt-n`` keeps one eps fixed and outputs the denoised ``D(v + sigma * eps)``.

The optimiser is Adam, written out so that an attack can differentiate through every iteration
(second-order gradients through the UNet). With option ``checkpoint`` (default on) each iteration runs
under :func:`harness.toolkit.diffusion.sampler.checkpointed`, the sampler's gradient checkpointing, so memory
for exact gradients stays flat in ``iters`` (see ``tests/test_bench_checkpointing.py``).
[reconstructed] noise level, number of iterations and step size are options (``tstar``, ``iters``,
``lr``); which output each variant returns follows PAPERS.md "Reference purifiers".
"""

from __future__ import annotations

import torch

from harness.api import (DefenseEntry, DiffusionPurifier, Kind, Metadata, NoiseDraws, Reported, checkpointed,
                        diffusion_options, entry_build, train_entry_ddpm)

BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


class ScoreOpt(DiffusionPurifier):
    """Unrolled Adam on the denoising loss; ``renoise`` selects -O (True) or -N (False).

    Draw k is the noise of iteration k (-O), or the one fixed noise (-N).
    """

    def __init__(self, loaded, *, tstar: float, iters: int, lr: float, renoise: bool, **kwargs):
        super().__init__(loaded, tstar=float(tstar), iters=int(iters), lr=float(lr), renoise=renoise, **kwargs)
        self.t = self.schedule.start_index(float(tstar))
        self.iters, self.lr, self.renoise = int(iters), float(lr), renoise

    def denoise(self, v: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        xt = self.schedule.diffuse(v, self.t, eps)
        return self.schedule.predict_x0(xt, self.t, self.eps(xt, self.t))

    def adam_step(self, k: int, v: torch.Tensor, m: torch.Tensor, s: torch.Tensor, eps: torch.Tensor,
                  graph: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Iteration ``k`` (1-based) of Adam on the denoising loss: the new ``(v, m, s)``; differentiable
        (second order through the UNet) when ``graph``, detached otherwise."""
        with torch.enable_grad():
            if not graph:
                v = v.detach().requires_grad_(True)
            loss = (self.denoise(v, eps) - v).pow(2).flatten(1).mean(1).sum()
            grad = torch.autograd.grad(loss, v, create_graph=graph)[0]
        m = BETAS[0] * m + (1 - BETAS[0]) * grad
        s = BETAS[1] * s + (1 - BETAS[1]) * grad * grad
        m_hat, s_hat = m / (1 - BETAS[0] ** k), s / (1 - BETAS[1] ** k)
        v = v - self.lr * m_hat / (s_hat + ADAM_EPS ** 2).sqrt()
        return (v, m, s) if graph else (v.detach(), m, s)

    def purify(self, x: torch.Tensor, noise: NoiseDraws) -> torch.Tensor:
        graph = torch.is_grad_enabled() and x.requires_grad
        draws = [noise.randn(x.shape[1:], device=x.device, dtype=x.dtype)
                 for _ in range(self.iters if self.renoise else 1)]
        v = x if graph else x.detach()
        m = torch.zeros_like(x)
        s = torch.zeros_like(x)
        ckpt = self.use_checkpoint and graph
        for k in range(1, self.iters + 1):
            eps = draws[k - 1] if self.renoise else draws[0]
            v, m, s = checkpointed(lambda v, m, s, eps, k=k: self.adam_step(k, v, m, s, eps, graph),
                                   v, m, s, eps, enabled=ckpt)
        if self.renoise:
            return v
        with torch.set_grad_enabled(graph):
            return checkpointed(self.denoise, v, draws[0], enabled=ckpt)


class ScoreOptO(ScoreOpt):
    def __init__(self, loaded, **kwargs):
        super().__init__(loaded, renoise=True, **kwargs)


class ScoreOptN(ScoreOpt):
    def __init__(self, loaded, **kwargs):
        super().__init__(loaded, renoise=False, **kwargs)


_SETTINGS = ("tstar", "iters", "lr")


def _entry(name: str, cls: type[ScoreOpt], variant: str, reported: tuple[Reported, ...]) -> DefenseEntry:
    return DefenseEntry(
        name=name,
        version="1",
        kind=Kind.PURIFIER,
        paper=f"Enhancing Adversarial Robustness via Score-Based Optimization ({variant})",
        citation="Zhang, Wang, Zhou, Chen, Lu. NeurIPS 2023. arXiv 2307.04333",
        build=entry_build(cls, _SETTINGS),
        options=diffusion_options(_SETTINGS),
        metadata=Metadata(architecture="DDPM UNet purifier + base classifier", nfe=6, venue="NeurIPS", year=2023),
        stochastic=True,
        differentiable=True,
        presets={
            "small": {"ddpm": "small", "tstar": 0.1, "iters": 5, "lr": 0.01},
            "paper": {"ddpm": "paper", "tstar": 0.1, "iters": 20, "lr": 0.01},
            "tiny": {"ddpm": "tiny", "tstar": 0.2, "iters": 2, "lr": 0.01},
        },
        train=train_entry_ddpm,
        reported=reported,
        description=f"Adam on the denoising loss under the DDPM prior ({variant}).",
    )


SCOREOPT_O = _entry("scoreopt-o", ScoreOptO, "ScoreOpt-O", (
    Reported("cifar10", "linf", "8/255", "AutoAttack standard, non-adaptive", 89.18, 89.01,
             "Chen & Lu 2025 (arXiv 2501.16904), Table 3", "WRN-28-10", tier="non-adaptive"),))
SCOREOPT_N = _entry("scoreopt-n", ScoreOptN, "ScoreOpt-N", ())

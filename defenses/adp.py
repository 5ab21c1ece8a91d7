"""``adp``: adversarial purification by noise injection and adaptive-step denoising-score ascent.

Yoon, Hwang, Lee, "Adversarial Purification with Score-based Generative Models", ICML 2021. The
input u (pixels in [0, 1]) is first smoothed by Gaussian noise, ``u_0 = clip(u + sigma * z)``, then
moved ``steps`` times along the score, ``u_{k+1} = clip(u_k + alpha_k * g(u_k))``, with a step size
chosen per image by a one-probe line search [paper, code]: with ``g' = g(u_k + delta * g)`` and
``c = <g, g'> / <g, g>``, ``alpha_k = clip(lambda * delta / (1 - c), 1e-5, 0.1)`` (the maximiser of
the log-density along g under a local quadratic model, scaled by ``lambda``). An image stops once its
``alpha_k`` falls to ``stop`` or below. Options (stored in the cell): ``sigma`` (injected noise,
pixel units), ``steps`` (maximum iterations), ``step_scale`` (lambda), ``score_sigma`` (noise level of
the score model, pixel units), ``stop``; ``delta = 1e-3`` and the clip range are the code's constants.

Score model [reconstructed]: the dataset's shared DDPM instead of ADP's noise-unconditional NCSN.
At the timestep t whose variance-exploding noise ``sqrt((1 - a_t) / a_t) / 2`` (pixel units) is
closest to ``score_sigma``, ``x_t = sqrt(a_t) (2u - 1)`` and the score in pixel units is
``grad_u log p(u) = -eps_theta(x_t, t) / sigma_t``. The direction g is that score times ``sigma_t``,
i.e. ``g = -eps_theta(x_t, t)``: ADP's network returns ``sigma * score`` (its code divides the
NCSNv2 output by 1 instead of sigma), so lambda, delta, the clip range and ``stop`` keep the paper's
values. ``score_sigma`` defaults to the injected noise (0.25; t ~ 0.145 T on the 1000-step linear
schedule): a DDPM's eps prediction is trained on inputs carrying exactly the noise of its timestep,
and ADP's inputs carry ``sigma``.

Not reproduced: ADP classifies by averaging softmax over 10 purification runs; a harness purifier maps
an image to one image, so one run is evaluated (the ``adaptive-eot`` protocol evaluates fresh
randomness worst-of-N). Exact gradients flow through both UNet calls of every step, the step size
included (the stop mask is held fixed); with ``checkpoint`` each step is recomputed during backward.
"""

from __future__ import annotations

import torch

from harness.api import (DefenseEntry, DiffusionPurifier, Kind, Metadata, NoiseDraws, UsageError, checkpointed,
                        diffusion_options, entry_build, train_entry_ddpm)

PROBE, MIN_STEP, MAX_STEP = 1e-3, 1e-5, 0.1  # ADP code: lr_min, min_step_lr, 10^4 * min_step_lr


class ADP(DiffusionPurifier):
    """Noise injection, then adaptive-step ascent along the DDPM's (noise-scaled) score.

    Draw 0 is the injected noise (the only random draw).
    """

    def __init__(self, loaded, *, sigma: float, steps: int, step_scale: float, score_sigma: float,
                 stop: float, **kwargs):
        super().__init__(loaded, sigma=float(sigma), steps=int(steps), step_scale=float(step_scale),
                         score_sigma=float(score_sigma), stop=float(stop), **kwargs)
        if not (sigma >= 0 and steps >= 0 and step_scale > 0 and score_sigma > 0):
            raise UsageError(f"adp needs sigma >= 0, steps >= 0, step_scale > 0 and score_sigma > 0; got "
                             f"{sigma}, {steps}, {step_scale}, {score_sigma}")
        self.sigma, self.steps, self.step_scale, self.stop = float(sigma), int(steps), float(step_scale), float(stop)
        self.t = self.schedule.sigma_index(2 * float(score_sigma))
        for unused in ("sampler", "eta"):  # ADP runs no reverse chain
            self.provenance.pop(unused, None)
        self.provenance.update(score_t=self.t, score_sigma_used=self.schedule.sigma(self.t) / 2)

    def direction(self, u: torch.Tensor) -> torch.Tensor:
        """``sigma_t * grad_u log p_t(u) = -eps_theta(sqrt(a_t) (2u - 1), t)`` for pixels u in [0, 1]."""
        a = self.schedule.alpha_bar(self.t).to(u)
        return -self.eps(a.sqrt() * (2 * u - 1), self.t)

    def step_size(self, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """ADP's adaptive step size per image (shape ``(batch,)``), from one probe along ``g``."""
        probe = self.direction(u + PROBE * g)
        gg = g.flatten(1).pow(2).sum(1)
        c = (g * probe).flatten(1).sum(1) / gg.clamp_min(torch.finfo(g.dtype).tiny)
        return (self.step_scale * PROBE / (1 - c)).clamp(MIN_STEP, MAX_STEP)

    def iteration(self, u: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One purification step; images whose step size fell to ``stop`` stay where they are."""
        g = self.direction(u)
        alpha = self.step_size(u, g)
        active = active & (alpha.detach() > self.stop)
        alpha = alpha * active
        return (u + alpha.view(-1, *[1] * (u.dim() - 1)) * g).clamp(0, 1), active

    def purify(self, x: torch.Tensor, noise: NoiseDraws) -> torch.Tensor:
        graph = torch.is_grad_enabled() and x.requires_grad
        z = noise.randn(x.shape[1:], device=x.device, dtype=x.dtype)
        with torch.set_grad_enabled(graph):
            u = ((x + 1) / 2 + self.sigma * z).clamp(0, 1)
            active = torch.ones(len(x), dtype=torch.bool, device=x.device)
            for _ in range(self.steps):
                u, active = checkpointed(self.iteration, u, active, enabled=self.use_checkpoint and graph)
                if not bool(active.any()):
                    break
            return 2 * u - 1


_SETTINGS = ("sigma", "steps", "step_scale", "score_sigma", "stop")
_SHARED = ("unet", "checkpoint", "batch_invariant")
_PRESET = {"sigma": 0.25, "step_scale": 0.05, "score_sigma": 0.25, "stop": 1e-3}

ADP_ENTRY = DefenseEntry(
    name="adp",
    version="1",
    kind=Kind.PURIFIER,
    paper="Adversarial Purification with Score-based Generative Models",
    citation="Yoon, Hwang, Lee. ICML 2021. arXiv 2106.06041",
    build=entry_build(ADP, _SETTINGS, shared=_SHARED),
    options=diffusion_options(_SETTINGS, _SHARED),
    metadata=Metadata(architecture="DDPM UNet score model + base classifier", nfe=11, venue="ICML", year=2021,
                      code_url="https://github.com/jmyoon1/adp"),
    stochastic=True,
    differentiable=True,
    presets={
        "small": {"ddpm": "small", "steps": 5, **_PRESET},
        "paper": {"ddpm": "paper", "steps": 10, **_PRESET},
        "tiny": {"ddpm": "tiny", "steps": 2, **_PRESET},
    },
    train=train_entry_ddpm,
    reported=(),
    description="Gaussian noise, then a few adaptive-step score-ascent steps with the shared DDPM.",
)

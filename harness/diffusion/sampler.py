"""Differentiable partial diffusion and reverse sampling with noise supplied by the caller.

The reverse update is the generalised DDIM step (Song, Meng & Ermon, "Denoising Diffusion Implicit
Models", ICLR 2021, Eq. 12) on a strided timestep sequence: ``eta = 1`` is ancestral DDPM sampling
(Ho et al. 2020), ``eta = 0`` deterministic DDIM. It equals diffusers' ``DDIMScheduler.step`` with
``variance_noise`` (tested), but takes arbitrary timestep pairs so a run can start at any t*.

Guided purifiers (DDA, MimicDiffusion) pull each step toward the input y. Their papers step
``x_{t-1}`` along ``-grad_{x_t} L(x0_hat(x_t), y)`` (through the UNet); harness takes the step on the
predicted clean image instead, ``x0_hat -= g`` with ``g = guide(x0_hat, t)`` (a gradient step of L in
x0 space, the predicted noise unchanged). It needs no double backward for exact attack gradients
and has a step size that does not blow up at high noise. [reconstructed]

Every reverse step can be wrapped in ``torch.utils.checkpoint`` (non-reentrant): activations of one
UNet call are recomputed during backward instead of stored, so memory for exact gradients through
the whole sampler stays flat in the number of steps. The noise is drawn before the loop and passed in,
so recomputation sees exactly the same randomness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["SAMPLERS", "EpsModel", "Guide", "Schedule"]

SAMPLERS = {"ddpm": 1.0, "ddim": 0.0}

EpsModel = Callable[[torch.Tensor, int], torch.Tensor]  # (x_t in [-1, 1] scale, t) -> predicted noise
Guide = Callable[[torch.Tensor, int], torch.Tensor]  # (predicted x_0, t) -> step to subtract from x_0


@dataclass(frozen=True)
class Schedule:
    """The cumulative products ``alpha_bar[t]`` of a discrete DDPM schedule, t = 0 .. T-1."""

    alphas_cumprod: torch.Tensor

    @property
    def num_steps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_bar(self, t: int) -> torch.Tensor:
        """``alpha_bar[t]``; ``t = -1`` is the clean end of the chain (1)."""
        return self.alphas_cumprod[t] if t >= 0 else torch.ones((), dtype=self.alphas_cumprod.dtype)

    def start_index(self, tstar: float) -> int:
        """The timestep index of diffusion time ``tstar`` in (0, 1] (DiffPure's t*)."""
        if not 0 < tstar <= 1:
            raise ValueError(f"t* must be in (0, 1], got {tstar}")
        return max(round(tstar * self.num_steps) - 1, 0)

    def timesteps(self, start: int, steps: int) -> list[int]:
        """``steps`` evenly spaced timesteps from ``start`` down to 0, all distinct."""
        if not 1 <= steps <= start + 1:
            raise ValueError(f"the number of reverse steps must be in [1, {start + 1}] for start "
                             f"timestep {start}, got {steps}")
        if steps == 1:
            return [start]
        return [round(start - k * start / (steps - 1)) for k in range(steps)]

    def diffuse(self, x0: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        """``q(x_t | x_0)``: ``sqrt(a) x_0 + sqrt(1 - a) eps`` with ``a = alpha_bar[t]``."""
        a = self.alpha_bar(t).to(x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def predict_x0(self, xt: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t).to(xt)
        return (xt - (1 - a).sqrt() * eps) / a.sqrt()

    def step(self, xt: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, noise: torch.Tensor,
             eta: float, guide: Guide | None = None) -> torch.Tensor:
        """One generalised DDIM step from ``t`` to ``t_prev`` (``-1`` = the clean image)."""
        a, a_prev = self.alpha_bar(t).to(xt), self.alpha_bar(t_prev).to(xt)
        x0 = self.predict_x0(xt, t, eps)
        if guide is not None:
            x0 = x0 - guide(x0, t)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp_min(0).sqrt()
        direction = (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps
        return a_prev.sqrt() * x0 + direction + sigma * noise

    def reverse(self, model: EpsModel, xt: torch.Tensor, timesteps: list[int], noises: list[torch.Tensor],
                eta: float, *, guide: Guide | None = None, use_checkpoint: bool = True) -> torch.Tensor:
        """Run the reverse chain over ``timesteps`` (descending) to the clean end; ``noises[k]`` is the
        noise of step k. With ``use_checkpoint`` each step is recomputed during backward."""
        if len(noises) != len(timesteps):
            raise ValueError("one noise tensor per reverse step is needed")
        prevs = timesteps[1:] + [-1]
        x = xt
        for t, t_prev, z in zip(timesteps, prevs, noises):
            def one_step(x_in: torch.Tensor, z_in: torch.Tensor, t=t, t_prev=t_prev) -> torch.Tensor:
                return self.step(x_in, t, t_prev, model(x_in, t), z_in, eta, guide)

            if use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(one_step, x, z, use_reentrant=False, preserve_rng_state=False)
            else:
                x = one_step(x, z)
        return x

"""Training a DDPM (Ho et al., NeurIPS 2020: epsilon prediction, uniform timesteps, MSE) and caching it.

One DDPM per (preset, dataset, training data, seed) is shared by every diffusion purifier: its recipe
(:func:`ddpm_recipe`) names neither the purifier nor the classifier, so :func:`shared_ddpm` trains it
once and every entry reuses the cached safetensors. All randomness comes from a private generator.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness.core.artifacts import Artifact, ArtifactCache
from harness.data import Split
from harness.toolkit.diffusion.model import build_unet, ddpm_preset, make_scheduler

__all__ = ["DDPM_RECIPE_VERSION", "ddpm_recipe", "train_ddpm", "shared_ddpm"]

DDPM_RECIPE_VERSION = "1"
log = logging.getLogger(__name__)


def ddpm_recipe(preset: str, split: Split, seed: int) -> dict[str, Any]:
    """Everything that determines the trained weights (hashed by :class:`ArtifactCache`)."""
    return {"what": "ddpm", "version": DDPM_RECIPE_VERSION, "preset": preset, "config": ddpm_preset(preset),
            "dataset": split.info.name, "split": split.split, "train_fingerprint": split.fingerprint,
            "seed": int(seed)}


def _batch(split: Split, size: int, gen: torch.Generator) -> torch.Tensor:
    """A random batch in [-1, 1] with random horizontal flips."""
    idx = torch.randint(0, len(split.labels), (size,), generator=gen)
    x = split.float_images(idx) * 2 - 1
    flip = torch.rand(size, generator=gen) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def train_ddpm(preset: str, split: Split, seed: int = 0, *, progress: bool = True,
               steps: int | None = None) -> dict[str, torch.Tensor]:
    """Train the UNet of DDPM preset ``preset`` on ``split``; return the (EMA) state dict.

    ``steps`` overrides the preset's number of optimiser steps (tests only; it is not in the recipe).
    """
    config = ddpm_preset(preset)
    recipe = config["train"]
    gen = torch.Generator().manual_seed(seed)
    unet = build_unet(config["unet"], split.info.image_shape, seed)
    scheduler = make_scheduler(config["schedule"])
    alphas = scheduler.alphas_cumprod
    ema = copy.deepcopy(unet).requires_grad_(False) if recipe["ema"] > 0 else None
    opt = torch.optim.Adam(unet.parameters(), lr=recipe["lr"])
    warmup = max(int(recipe["warmup"]), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    total = int(steps if steps is not None else recipe["steps"])
    unet.train()
    bar = tqdm(range(total), desc=f"ddpm {preset}", disable=not progress, unit="step")
    loss = float("nan")
    with torch.random.fork_rng():  # dropout (paper preset) draws from the global RNG: seed it, restore it
        torch.manual_seed(seed)
        for _ in bar:
            loss = _step(unet, ema, opt, split, recipe, alphas, gen)
            sched.step()
            bar.set_postfix(loss=f"{loss:.4f}")
    log.info("trained DDPM %s for %d steps, last loss %.4f", preset, total, loss)
    final = ema if ema is not None else unet
    return {k: v.detach().clone() for k, v in final.state_dict().items()}


def _step(unet: torch.nn.Module, ema: torch.nn.Module | None, opt: torch.optim.Optimizer, split: Split,
          recipe: dict[str, Any], alphas: torch.Tensor, gen: torch.Generator) -> float:
    """One optimiser step of the epsilon-prediction loss (and the EMA update); returns the loss."""
    x0 = _batch(split, recipe["batch_size"], gen)
    t = torch.randint(0, len(alphas), (len(x0),), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    loss = F.mse_loss(unet(xt, t).sample, eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), recipe["grad_clip"])
    opt.step()
    if ema is not None:
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - recipe["ema"])
    return loss.item()


def shared_ddpm(cache: ArtifactCache, preset: str, split: Split, seed: int = 0, *,
                progress: bool = True) -> Artifact:
    """The DDPM of ``preset`` for ``split``: cached under ``ddpm/<hash>``, trained on first use."""
    recipe = ddpm_recipe(preset, split, seed)
    return cache.get_or_train("ddpm", recipe, lambda: train_ddpm(preset, split, seed, progress=progress),
                              what=f"DDPM {preset!r} on {split.info.name}")

"""Frozen diffusion-model features of images: the target ``z`` of DRA and the input of the
"diffusion features are partially robust" probe (PAPERS.md §3).

An image ``x`` in [0, 1] is scaled to [-1, 1], noised to a fixed timestep ``t`` with the DDPM forward
process (Ho et al., NeurIPS 2020, eq. 4: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``) using noise
pinned per image (:func:`pinned_noise`), and passed through the noise-prediction UNet; the activation
of one block is pooled over space into a vector (as in diffusion-feature readouts such as Baranchuk et
al., ICLR 2022, "Label-Efficient Semantic Segmentation with Diffusion Models").

Early exit: :class:`DiffusionFeatures` calls the whole ``UNet2DModel`` (so its timestep embedding and
block wiring are diffusers' own, whatever the version) with a forward hook on the chosen block; the
hook stores the block's output and raises a private exception that stops the forward pass there. The
captured tensor keeps its autograd graph, so gradients w.r.t. ``x`` are exact, and the blocks after it
(for ``mid``: the whole up path; for ``down.K``: the rest of the down path too) are never run.

:func:`cached_features` computes the features of every training image once and caches them as an
artifact (a UNet forward per batch dominates a CPU training step of DRA).
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from harness.core.artifacts import Artifact, ArtifactCache
from harness.core.errors import UsageError
from harness.core.keys import content_hash
from harness.core.noise import FixedNoise
from harness.data import Split, load_split
from harness.toolkit.diffusion.model import LoadedUNet, unet_from_state
from harness.toolkit.diffusion.train import DDPM_RECIPE_VERSION, shared_ddpm

if TYPE_CHECKING:
    from diffusers import UNet2DModel

__all__ = ["FEATURES_RECIPE_VERSION", "NOISE_NAMESPACE", "POOLS", "DiffusionFeatures", "pinned_noise",
           "feature_blocks", "load_feature_ddpm", "features_recipe", "cached_features"]

FEATURES_RECIPE_VERSION = "1"
NOISE_NAMESPACE = "dra-features"
POOLS = ("avg", "max")
log = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the capture hook to stop the UNet right after the chosen block."""


def feature_blocks(unet: UNet2DModel) -> list[str]:
    """The block names :class:`DiffusionFeatures` accepts for ``unet``: ``down.K``, ``mid``, ``up.K``."""
    names = [f"down.{k}" for k in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid")
    return names + [f"up.{k}" for k in range(len(unet.up_blocks))]


def _block_channels(unet: UNet2DModel, block: str) -> int:
    """Output channels of ``block`` (diffusers: down K -> block_out_channels[K], mid -> the last one,
    up K -> the reversed list's K-th)."""
    channels = list(unet.config.block_out_channels)
    if block == "mid":
        return int(channels[-1])
    side, k = block.split(".")
    return int(channels[int(k)] if side == "down" else channels[::-1][int(k)])


def _resolve_block(unet: UNet2DModel, block: str) -> nn.Module:
    valid = feature_blocks(unet)
    if block not in valid:
        raise UsageError(f"unknown UNet block {block!r}; valid: {', '.join(valid)}")
    if block == "mid":
        return unet.mid_block
    side, k = re.fullmatch(r"(down|up)\.(\d+)", block).groups()  # type: ignore[union-attr]
    return (unet.down_blocks if side == "down" else unet.up_blocks)[int(k)]


class DiffusionFeatures(nn.Module):
    """Pooled activation of one block of a frozen DDPM UNet at timestep ``timestep``: ``(N, dim)``.

    ``forward(x, noise)``: ``x`` in [0, 1] of shape (N, C, H, W), ``noise`` standard normal of the same
    shape (pinned per image, :func:`pinned_noise`). Differentiable w.r.t. ``x``; the UNet is frozen.
    Batched: on a CPU an image's features agree across batches to float rounding, not bit for bit.
    """

    def __init__(self, unet: UNet2DModel, alphas_cumprod: torch.Tensor, timestep: int, block: str = "mid",
                 pool: str = "avg"):
        super().__init__()
        if pool not in POOLS:
            raise UsageError(f"unknown pooling {pool!r}; valid: {', '.join(POOLS)}")
        steps = len(alphas_cumprod)
        if not 0 <= int(timestep) < steps:
            raise UsageError(f"timestep {timestep} is outside the schedule's 0..{steps - 1}")
        self.unet = unet.eval().requires_grad_(False)
        self._block = _resolve_block(unet, block)
        self.block, self.pool, self.timestep = block, pool, int(timestep)
        self._dim = _block_channels(unet, block)
        self.register_buffer("alpha", alphas_cumprod[int(timestep)].detach().float().clone(), persistent=False)

    @property
    def dim(self) -> int:
        """Feature dimension (channels of the captured block)."""
        return self._dim

    def train(self, mode: bool = True) -> "DiffusionFeatures":
        """Stays in eval mode: the UNet is frozen (no dropout, whatever the caller's mode)."""
        return super().train(False)

    def noised(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(a_t) (2x - 1) + sqrt(1 - a_t) noise``."""
        if noise.shape != x.shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)} for images of shape {tuple(x.shape)}")
        a = self.alpha.to(x.dtype)
        return a.sqrt() * (2 * x - 1) + (1 - a).sqrt() * noise.to(x)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        xt = self.noised(x, noise)
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)  # down blocks: (h, res)
            raise _Captured

        handle = self._block.register_forward_hook(hook)
        try:
            t = torch.full((len(x),), self.timestep, dtype=torch.long, device=x.device)
            self.unet(xt, t)
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured:  # pragma: no cover - the block is part of the UNet's forward
            raise RuntimeError(f"UNet block {self.block!r} was not reached")
        h = captured[0]
        return h.mean(dim=(2, 3)) if self.pool == "avg" else h.amax(dim=(2, 3))


def pinned_noise(indices: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise of shape ``(len(indices), *shape)``, row ``i`` a function of
    ``(seed, indices[i])`` only (:class:`~harness.core.noise.FixedNoise`, namespace ``dra-features``),
    so an image gets the same noise in every batch."""
    return FixedNoise(seed, NOISE_NAMESPACE).draws(indices).randn(tuple(shape))


def load_feature_ddpm(artifacts: ArtifactCache, split: Split, preset: str = "small", seed: int = 0, *,
                      progress: bool = True) -> tuple[LoadedUNet, Artifact]:
    """The project's shared unconditional DDPM of ``preset`` trained on ``split`` (the dataset's real
    training split; trained on first use if the cache allows it,
    :func:`~harness.toolkit.diffusion.train.shared_ddpm`), frozen, and its artifact."""
    artifact = shared_ddpm(artifacts, preset, split, seed, progress=progress)
    loaded = unet_from_state(preset, artifact.load(), split.info.image_shape,
                             {"source": f"trained:{preset}", "kind": "harness", "artifact": artifact.key,
                              "recipe_version": DDPM_RECIPE_VERSION})
    return loaded, artifact


def features_recipe(ddpm: Artifact, split: Split, *, preset: str, timestep: int, block: str, pool: str,
                    seed: int, indices: torch.Tensor | None = None) -> dict[str, Any]:
    """Everything that determines the cached features (hashed by :class:`ArtifactCache`); ``indices``
    (a subset of the split) enter as their count and content hash."""
    recipe = {"what": "diffusion-features", "version": FEATURES_RECIPE_VERSION, "ddpm": ddpm.key,
              "ddpm_preset": preset, "dataset": split.info.name, "split": split.split,
              "fingerprint": split.fingerprint, "timestep": int(timestep), "block": block, "pool": pool,
              "noise": {"seed": int(seed), "namespace": NOISE_NAMESPACE}}
    if indices is not None:
        recipe["subset"] = {"n": len(indices), "sha": content_hash([int(i) for i in indices])}
    return recipe


def _compute(model: DiffusionFeatures, split: Split, indices: torch.Tensor, seed: int, batch_size: int,
             progress: bool) -> torch.Tensor:
    out = torch.empty((len(indices), model.dim), dtype=torch.float32)
    started = time.time()
    with torch.inference_mode():
        for lo in tqdm(range(0, len(indices), batch_size), disable=not progress, unit="batch",
                       desc=f"diffusion features t={model.timestep} {model.block}"):
            idx = indices[lo:lo + batch_size]
            x = split.float_images(idx)
            out[lo:lo + len(idx)] = model(x, pinned_noise(idx, tuple(x.shape[1:]), seed)).float()
    seconds = time.time() - started
    log.info("diffusion features of %d images in %.1f s (%.1f s per 1000)", len(indices), seconds,
             1000 * seconds / max(len(indices), 1))
    return out


def cached_features(artifacts: ArtifactCache, split: Split, *, preset: str, timestep: int, block: str,
                    pool: str, seed: int = 0, batch_size: int = 256, progress: bool = True,
                    ddpm_seed: int = 0, indices: torch.Tensor | None = None, ddpm_split: Split | None = None,
                    data_root: str | None = None) -> torch.Tensor:
    """Float32 ``(N, D)`` features of every image of ``split`` (clean, noise pinned by image index with
    ``seed``) from the shared DDPM of ``preset`` (trained with ``ddpm_seed``), cached as artifact
    ``diffusion-features/<hash>``; the recipe holds the DDPM's artifact hash and the split fingerprint.

    The DDPM is always the one trained on the dataset's real training split: ``split`` itself when it is
    that split, else ``ddpm_split`` or the dataset's ``train`` split under ``data_root`` (so the features
    of a synthetic or test split come from the same DDPM as those of the training images).
    ``indices``: only those images, in that order (``(len(indices), D)``); read from the features of the
    whole split when those are cached already, else computed and cached on their own.
    """
    if pool not in POOLS:
        raise UsageError(f"unknown pooling {pool!r}; valid: {', '.join(POOLS)}")
    if ddpm_split is None:
        ddpm_split = split if split.split == "train" else load_split(split.info.name, "train", data_root)
    loaded, ddpm = load_feature_ddpm(artifacts, ddpm_split, preset, ddpm_seed, progress=progress)
    model = DiffusionFeatures(loaded.unet, loaded.scheduler.alphas_cumprod, timestep, block, pool)
    settings = {"preset": preset, "timestep": timestep, "block": block, "pool": pool, "seed": seed}
    if indices is not None:
        indices = torch.as_tensor(indices, dtype=torch.long)
        whole = artifacts.find("diffusion-features", features_recipe(ddpm, split, **settings))
        if whole is not None:
            return whole.load()["features"][indices]
    recipe = features_recipe(ddpm, split, **settings, indices=indices)
    chosen = torch.arange(len(split.labels)) if indices is None else indices
    artifact = artifacts.get_or_train(
        "diffusion-features", recipe,
        lambda: {"features": _compute(model, split, chosen, seed, batch_size, progress)},
        what=f"diffusion features ({preset}, t={timestep}, {block}, {pool}) of {split.info.name} {split.split}")
    return artifact.load()["features"]

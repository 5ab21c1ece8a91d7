"""DDPM noise-prediction UNets (diffusers ``UNet2DModel``) and their noise schedules.

Presets name a UNet architecture, a noise schedule and a training recipe together:

* ``tiny``: a toy UNet for tests (seconds on a CPU).
* ``small``: CPU-sized (block_out_channels 32/64/64, one layer per block, no attention); its recipe
  trains in well under an hour on 2 CPU cores (see :mod:`harness.toolkit.diffusion.train`).
* ``paper``: the CIFAR-10 DDPM of Ho et al., "Denoising Diffusion Probabilistic Models",
  NeurIPS 2020 (35.7M parameters, attention at 16x16, linear betas 1e-4..0.02 over 1000 steps).

Pretrained models load through ``UNet2DModel.from_pretrained`` from ``hf:<repo id>[:<subfolder>]`` or
a local ``save_pretrained`` folder (:func:`load_unet`).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

if TYPE_CHECKING:  # diffusers is imported when a UNet is first built, not with harness
    from diffusers import DDPMScheduler, UNet2DModel

from harness.core.errors import UsageError
from harness.core.keys import state_fingerprint

__all__ = ["DDPM_PRESETS", "LoadedUNet", "ddpm_preset", "build_unet", "make_scheduler", "load_unet",
           "unet_from_state"]

log = logging.getLogger(__name__)

_LINEAR = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}

DDPM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "unet": {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4,
                 "down_block_types": ("DownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "UpBlock2D"), "add_attention": False},
        "schedule": dict(_LINEAR, num_train_timesteps=100),
        "train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup": 1, "ema": 0.0, "grad_clip": 1.0},
    },
    "small": {
        "unet": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8,
                 "down_block_types": ("DownBlock2D",) * 3, "up_block_types": ("UpBlock2D",) * 3,
                 "add_attention": False},
        "schedule": _LINEAR,
        # measured 2.3 s per step of 64 images on one thread of a busy 2-core machine: ~40 min
        "train": {"steps": 1000, "batch_size": 64, "lr": 5e-4, "warmup": 100, "ema": 0.995,
                  "grad_clip": 1.0},
    },
    "paper": {
        "unet": {"block_out_channels": (128, 256, 256, 256), "layers_per_block": 2, "norm_num_groups": 32,
                 "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 "dropout": 0.1, "add_attention": True},
        "schedule": _LINEAR,
        "train": {"steps": 800_000, "batch_size": 128, "lr": 2e-4, "warmup": 5000, "ema": 0.9999,
                  "grad_clip": 1.0},
    },
}


def ddpm_preset(name: str) -> dict[str, Any]:
    """A deep copy of DDPM preset ``name``."""
    if name not in DDPM_PRESETS:
        raise UsageError(f"unknown DDPM preset {name!r}; valid: {', '.join(DDPM_PRESETS)}")
    return copy.deepcopy(DDPM_PRESETS[name])


def build_unet(unet_config: Mapping[str, Any], image_shape: tuple[int, int, int], seed: int = 0) -> UNet2DModel:
    """A noise-prediction UNet for images of ``image_shape`` (C, H, W), initialised from ``seed``
    (torch's global RNG is forked, so callers' random state is untouched)."""
    channels, height, _ = image_shape
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in unet_config.items()}
    from diffusers import UNet2DModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DModel(sample_size=height, in_channels=channels, out_channels=channels, **kwargs)


def make_scheduler(schedule: Mapping[str, Any]) -> DDPMScheduler:
    """The diffusers DDPM scheduler of a preset's ``schedule`` (its ``alphas_cumprod`` drive sampling)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**schedule, clip_sample=False)


@dataclass
class LoadedUNet:
    """A frozen UNet, the scheduler it was trained with, and where it came from."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    provenance: dict[str, Any] = field(default_factory=dict)


def _freeze(unet: UNet2DModel) -> UNet2DModel:
    unet.eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    return unet


def _pretrained_scheduler(location: str, subfolder: str | None, default: Mapping[str, Any]) -> DDPMScheduler:
    """The scheduler saved next to a pretrained UNet (``scheduler/`` or alongside it), else ``default``."""
    from diffusers import DDPMScheduler

    for sub in ("scheduler", subfolder):
        try:
            return DDPMScheduler.from_pretrained(location, subfolder=sub, clip_sample=False)
        except (OSError, ValueError):
            continue
    log.info("no scheduler config with %s; using the default linear schedule", location)
    return make_scheduler(default)


def load_unet(source: str, *, default_schedule: Mapping[str, Any] = _LINEAR) -> LoadedUNet:
    """Load a pretrained UNet from ``hf:<repo id>[:<subfolder>]`` or a local ``save_pretrained`` folder.

    Hub downloads go through the Hugging Face cache (set ``HF_HUB_OFFLINE=1`` to forbid network use).
    """
    if source.startswith("hf:"):
        repo, _, subfolder = source[3:].partition(":")
        location, kind = repo, "huggingface"
    else:
        path = Path(source).expanduser()
        if not (path / "config.json").is_file() and not (path / "unet" / "config.json").is_file():
            raise UsageError(f"{source!r} is neither hf:<repo id> nor a save_pretrained folder "
                             f"(no config.json in it or in its unet/ subfolder)")
        subfolder = "" if (path / "config.json").is_file() else "unet"
        location, kind = str(path.resolve()), "local"
    try:
        from diffusers import UNet2DModel

        unet = UNet2DModel.from_pretrained(location, subfolder=subfolder or None)
    except OSError as exc:
        raise UsageError(f"cannot load UNet from {source!r}: {exc}") from None
    scheduler = _pretrained_scheduler(location, subfolder or None, default_schedule)
    provenance = {"source": source, "kind": kind, "location": location, "subfolder": subfolder,
                  "weights_sha256": state_fingerprint(unet.state_dict()),
                  "config": json.loads(json.dumps(dict(unet.config), default=str)),
                  "schedule": {k: scheduler.config[k] for k in ("num_train_timesteps", "beta_start",
                                                                 "beta_end", "beta_schedule")}}
    return LoadedUNet(_freeze(unet), scheduler, provenance)


def unet_from_state(preset: str, state: Mapping[str, torch.Tensor], image_shape: tuple[int, int, int],
                    provenance: Mapping[str, Any]) -> LoadedUNet:
    """A frozen UNet of DDPM preset ``preset`` holding ``state`` (harness-trained weights)."""
    config = ddpm_preset(preset)
    unet = build_unet(config["unet"], image_shape)
    unet.load_state_dict(dict(state))
    return LoadedUNet(_freeze(unet), make_scheduler(config["schedule"]),
                      dict(provenance, preset=preset, schedule=config["schedule"],
                           weights_sha256=state_fingerprint(unet.state_dict())))

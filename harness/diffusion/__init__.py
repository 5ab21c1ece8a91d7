"""Diffusion models for purification: diffusers UNets, DDPM training, a differentiable sampler with
caller-supplied noise and gradient checkpointing, and the base class of diffusion purifiers."""

from harness.diffusion.model import DDPM_PRESETS, LoadedUNet, build_unet, ddpm_preset, load_unet, make_scheduler
from harness.diffusion.purifier import DiffusionPurifier, load_entry_unet, resolve_options, train_entry_ddpm
from harness.diffusion.sampler import SAMPLERS, Schedule
from harness.diffusion.train import ddpm_recipe, shared_ddpm, train_ddpm

__all__ = ["DDPM_PRESETS", "LoadedUNet", "build_unet", "ddpm_preset", "load_unet", "make_scheduler",
           "DiffusionPurifier", "load_entry_unet", "resolve_options", "train_entry_ddpm", "SAMPLERS",
           "Schedule", "ddpm_recipe", "shared_ddpm", "train_ddpm"]

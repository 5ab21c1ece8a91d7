"""Diffusion models for purification: diffusers UNets, DDPM training, a differentiable sampler with
caller-supplied noise and gradient checkpointing (:func:`checkpointed`, shared by every unrolled
purifier), and the base class of diffusion purifiers.

CPU recipe (2 cores): ``harness train ddpm --dataset cifar10 --preset small`` once (about 40 min;
shared by diffpure, dda, mimicdiffusion, scoreopt-o/-n, adp), then e.g.
``harness run --defense diffpure --protocol non-adaptive,adaptive,bpda --attack pgd:steps=10 --n 32``
and ``harness run --defense diffpure --protocol adaptive-eot --attack pgd:steps=10,eot=2 --n 32``.
Class-conditional generation (classifier-free guidance) for synthetic training data:
:mod:`harness.toolkit.diffusion.conditional` and ``harness data synth``.
A pretrained model instead: ``--option unet=hf:google/ddpm-cifar10-32`` or ``--option unet=FOLDER``.
"""

from harness.toolkit.diffusion.features import (DiffusionFeatures, cached_features, feature_blocks,
                                               load_feature_ddpm, pinned_noise)
from harness.toolkit.diffusion.model import DDPM_PRESETS, LoadedUNet, build_unet, ddpm_preset, load_unet, make_scheduler
from harness.toolkit.diffusion.purifier import DiffusionPurifier, diffusion_options, load_entry_unet, train_entry_ddpm
from harness.toolkit.diffusion.sampler import SAMPLERS, GradientGuide, Schedule, checkpointed
from harness.toolkit.diffusion.train import ddpm_recipe, shared_ddpm, train_ddpm
from harness.toolkit.diffusion.conditional import (ConditionalDDPM, conditional_ddpm_recipe, conditional_from_artifact,
                                                   shared_conditional_ddpm, train_conditional_ddpm)

__all__ = ["DDPM_PRESETS", "LoadedUNet", "build_unet", "ddpm_preset", "load_unet", "make_scheduler",
           "DiffusionPurifier", "load_entry_unet", "diffusion_options", "train_entry_ddpm", "SAMPLERS",
           "GradientGuide", "Schedule", "checkpointed", "ddpm_recipe", "shared_ddpm", "train_ddpm",
           "DiffusionFeatures", "cached_features", "feature_blocks", "load_feature_ddpm", "pinned_noise",
           "ConditionalDDPM", "conditional_ddpm_recipe", "conditional_from_artifact", "shared_conditional_ddpm",
           "train_conditional_ddpm"]

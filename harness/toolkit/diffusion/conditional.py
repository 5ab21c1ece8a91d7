"""A class-conditional DDPM with classifier-free guidance, trained by the project's DDPM recipe.

The UNet is the preset's diffusers ``UNet2DModel`` with ``num_class_embeds = num_classes + 1``: a
learned class embedding is added to the timestep embedding, and the extra index ``num_classes`` is
the *null* class. Training is the epsilon-prediction loss of Ho et al., "Denoising Diffusion
Probabilistic Models" (NeurIPS 2020), with each label replaced by the null class with probability
``label_dropout`` so that one network learns both ``eps(x, c)`` and ``eps(x)``. Sampling mixes them
as in Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022): ``(1 + w) eps(x, c) - w eps(x)``
(``w = 0`` is plain conditional sampling), on the strided DDIM chain of Song et al., "Denoising
Diffusion Implicit Models" (ICLR 2021) shared with the purifiers (:class:`Schedule`).

The recipe (:func:`conditional_ddpm_recipe`) is a kind of its own (``what = "ddpm-conditional"``,
``conditional: true``) cached beside the unconditional DDPM under ``ddpm/<hash>``; the unconditional
:func:`~harness.toolkit.diffusion.train.ddpm_recipe` is unchanged. Generated sets for training
follow Wang et al., "Better Diffusion Models Further Improve Adversarial Training" (ICML 2023).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness.core.artifacts import Artifact, ArtifactCache
from harness.core.errors import UsageError
from harness.core.keys import state_fingerprint
from harness.data import Split
from harness.toolkit.diffusion.model import build_unet, ddpm_preset, make_scheduler
from harness.toolkit.diffusion.sampler import Schedule
from harness.toolkit.diffusion.train import ddpm_recipe

if TYPE_CHECKING:  # diffusers is imported when a UNet is first built
    from diffusers import UNet2DModel

__all__ = ["CONDITIONAL_DDPM_RECIPE_VERSION", "LABEL_DROPOUT", "ConditionalDDPM", "conditional_ddpm_recipe",
           "build_conditional_unet", "train_conditional_ddpm", "shared_conditional_ddpm",
           "conditional_from_artifact", "guided_eps", "sample_conditional"]

CONDITIONAL_DDPM_RECIPE_VERSION = "1"
LABEL_DROPOUT = 0.1  # Ho & Salimans 2022 use p_uncond in {0.1, 0.2}
log = logging.getLogger(__name__)


def _check_dropout(label_dropout: float) -> float:
    p = float(label_dropout)
    if not 0.0 <= p < 1.0:
        raise UsageError(f"label dropout must be in [0, 1), got {label_dropout!r}")
    return p


def conditional_ddpm_recipe(preset: str, split: Split, seed: int = 0, *,
                            label_dropout: float = LABEL_DROPOUT) -> dict[str, Any]:
    """Everything that determines the conditional DDPM's weights: the unconditional recipe's fields
    plus ``conditional``, the class count, the null class index and the label-dropout probability."""
    recipe = ddpm_recipe(preset, split, seed)
    num_classes = int(split.info.num_classes)
    recipe.update({"what": "ddpm-conditional", "version": CONDITIONAL_DDPM_RECIPE_VERSION, "conditional": True,
                   "num_classes": num_classes, "null_class": num_classes,
                   "label_dropout": _check_dropout(label_dropout), "hflip": bool(split.info.hflip)})
    return recipe


def build_conditional_unet(unet_config: Mapping[str, Any], image_shape: tuple[int, int, int], num_classes: int,
                           seed: int = 0) -> UNet2DModel:
    """The preset's UNet with a class embedding of ``num_classes + 1`` rows (the last: the null class)."""
    return build_unet({**unet_config, "num_class_embeds": int(num_classes) + 1}, image_shape, seed)


def _labelled_batch(split: Split, size: int, gen: torch.Generator, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch in [-1, 1] with its labels; random horizontal flips where they keep the label."""
    idx = torch.randint(0, len(split.labels), (size,), generator=gen)
    x = split.float_images(idx) * 2 - 1
    flips = torch.rand(size, generator=gen) < 0.5
    if flip:
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    return x, split.labels[idx].long()


def train_conditional_ddpm(preset: str, split: Split, seed: int = 0, *, label_dropout: float = LABEL_DROPOUT,
                           progress: bool = True, steps: int | None = None) -> dict[str, torch.Tensor]:
    """Train the class-conditional UNet of DDPM preset ``preset`` on ``split`` (the preset's optimiser,
    warm-up, EMA and clipping); return the (EMA) state dict. ``steps`` overrides the preset's step count
    (tests only; not in the recipe). All randomness comes from a generator seeded with ``seed``."""
    config = ddpm_preset(preset)
    recipe = config["train"]
    p = _check_dropout(label_dropout)
    num_classes = int(split.info.num_classes)
    gen = torch.Generator().manual_seed(seed)
    unet = build_conditional_unet(config["unet"], split.info.image_shape, num_classes, seed)
    alphas = make_scheduler(config["schedule"]).alphas_cumprod
    ema = copy.deepcopy(unet).requires_grad_(False) if recipe["ema"] > 0 else None
    opt = torch.optim.Adam(unet.parameters(), lr=recipe["lr"])
    warmup = max(int(recipe["warmup"]), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    total = int(steps if steps is not None else recipe["steps"])
    unet.train()
    bar = tqdm(range(total), desc=f"conditional ddpm {preset}", disable=not progress, unit="step")
    loss = float("nan")
    with torch.random.fork_rng():  # dropout (paper preset) draws from the global RNG: seed it, restore it
        torch.manual_seed(seed)
        for _ in bar:
            x0, y = _labelled_batch(split, recipe["batch_size"], gen, bool(split.info.hflip))
            y = torch.where(torch.rand(len(y), generator=gen) < p, torch.full_like(y, num_classes), y)
            t = torch.randint(0, len(alphas), (len(x0),), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            step_loss = F.mse_loss(unet(xt, t, class_labels=y).sample, eps)
            opt.zero_grad(set_to_none=True)
            step_loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), recipe["grad_clip"])
            opt.step()
            sched.step()
            if ema is not None:
                with torch.no_grad():
                    for pe, pu in zip(ema.parameters(), unet.parameters()):
                        pe.lerp_(pu, 1 - recipe["ema"])
            loss = step_loss.item()
            bar.set_postfix(loss=f"{loss:.4f}")
    log.info("trained conditional DDPM %s for %d steps, last loss %.4f", preset, total, loss)
    final = ema if ema is not None else unet
    return {k: v.detach().clone() for k, v in final.state_dict().items()}


def shared_conditional_ddpm(cache: ArtifactCache, preset: str, split: Split, seed: int = 0, *,
                            label_dropout: float = LABEL_DROPOUT, progress: bool = True) -> Artifact:
    """The conditional DDPM of ``preset`` for ``split``: cached under ``ddpm/<hash>`` beside the
    unconditional one, trained on first use (once, under the artifact's file lock)."""
    recipe = conditional_ddpm_recipe(preset, split, seed, label_dropout=label_dropout)
    return cache.get_or_train(
        "ddpm", recipe,
        lambda: train_conditional_ddpm(preset, split, seed, label_dropout=label_dropout, progress=progress),
        what=f"conditional DDPM {preset!r} on {split.info.name}")


@dataclass
class ConditionalDDPM:
    """A frozen class-conditional UNet, its schedule, the null class index and its provenance."""

    unet: UNet2DModel
    schedule: Schedule
    num_classes: int
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def null_class(self) -> int:
        return self.num_classes


def conditional_from_artifact(artifact: Artifact, image_shape: tuple[int, int, int]) -> ConditionalDDPM:
    """The frozen conditional UNet stored in ``artifact`` (a :func:`shared_conditional_ddpm` result)."""
    recipe = artifact.recipe
    if not recipe.get("conditional"):
        raise UsageError(f"artifact {artifact.path} is not a conditional DDPM (its recipe has no conditional: true)")
    config = recipe["config"]
    unet = build_conditional_unet(config["unet"], image_shape, int(recipe["num_classes"]))
    state = artifact.load()
    try:
        unet.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"cached artifact {artifact.path} does not fit its recipe "
                         f"({str(exc).splitlines()[0]}); delete that folder and run again to retrain it") from None
    unet.eval().requires_grad_(False)
    schedule = Schedule(make_scheduler(config["schedule"]).alphas_cumprod.float().clone())
    provenance = {"artifact": artifact.key, "kind": recipe["what"], "preset": recipe["preset"],
                  "label_dropout": recipe["label_dropout"], "train_fingerprint": recipe["train_fingerprint"],
                  "seed": recipe["seed"], "weights_sha256": state_fingerprint(state)}
    return ConditionalDDPM(unet, schedule, int(recipe["num_classes"]), provenance)


def guided_eps(model: ConditionalDDPM, x: torch.Tensor, t: int, labels: torch.Tensor,
               guidance: float) -> torch.Tensor:
    """Classifier-free guided noise ``(1 + w) eps(x, c) - w eps(x, null)`` (Ho & Salimans 2022, Eq. 6);
    the two predictions share one UNet call on a doubled batch. ``w = 0``: conditional only."""
    if guidance == 0:
        return model.unet(x, t, class_labels=labels).sample
    null = torch.full_like(labels, model.null_class)
    both = model.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
    cond, uncond = both.chunk(2)
    return cond + guidance * (cond - uncond)


@torch.no_grad()
def sample_conditional(model: ConditionalDDPM, labels: torch.Tensor, noise: torch.Tensor, *, steps: int,
                       eta: float, guidance: float, step_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Images in [-1, 1] of classes ``labels`` from the starting noise ``noise`` (x_T), by ``steps``
    generalised DDIM steps from T-1 to 0 (``eta = 0``: DDIM, ``eta = 1``: ancestral DDPM).
    ``step_noise`` (``(steps, B, C, H, W)``) is the per-step noise when ``eta > 0``."""
    timesteps = model.schedule.timesteps(model.schedule.num_steps - 1, int(steps))
    if eta > 0 and step_noise is None:
        raise ValueError("eta > 0 needs per-step noise")
    noises = list(step_noise) if step_noise is not None else [torch.zeros_like(noise)] * len(timesteps)
    labels = labels.long()
    return model.schedule.reverse(lambda x, t: guided_eps(model, x, t, labels, guidance), noise, timesteps,
                                  noises, float(eta), use_checkpoint=False)

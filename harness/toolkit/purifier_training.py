"""A generic training loop for purifiers trained on adversarial/clean pairs.

The loss is a callable, so purifiers that differ only in their objective share the loop: MAEP's masked
L1 (Chen & Lu 2025, arXiv:2501.16904, Eq. 15) and DISCO's unmasked L1 (Ho & Vasconcelos, NeurIPS 2022).
AdamW (Loshchilov & Hutter, ICLR 2019) with a linear warm-up then a cosine decay to zero (Loshchilov &
Hutter, "SGDR", ICLR 2017). All randomness (shuffling, flips, clean-pair mixing and whatever the loss
draws, such as MAE masks) comes from one generator seeded with ``seed``; the global RNG is not used.

Reproducible from the recipe: a training's floating-point reductions (matrix products, LayerNorm and
attention backward) are split across torch's intra-op threads, so their rounding, and after a few
thousand AdamW steps the weights, depend on the thread count (and on the CPU's vector ISA, which no
setting fixes). :func:`reproducible_training` pins the thread count (``$HARNESS_TRAIN_THREADS``, default
:data:`TRAIN_THREADS`) and torch's deterministic algorithms while a recipe trains, and the artifact's
provenance records that environment: two trainings of one recipe on machines with the same torch and
CPU capability give bit-identical weights, whatever their core counts.

:func:`train_on_pairs` is the whole ``train`` recipe of such a purifier entry: its PGD pairs, a fresh
model, then one or more training stages.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from harness.toolkit.pairs import training_pairs

if TYPE_CHECKING:  # pragma: no cover - typing only
    from harness.core.context import TrainContext

__all__ = ["LossFn", "ModelFactory", "Stage", "TRAIN_THREADS", "TRAIN_THREADS_ENV", "reproducible_training",
           "training_environment", "train_on_pairs", "train_purifier"]

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
"""``loss_fn(model, x_adv, x_clean, generator) -> scalar``; draws its randomness from ``generator``."""

ModelFactory = Callable[[Mapping[str, Any], Sequence[int], int], nn.Module]
"""``new_model(model_config, image_shape, seed)``: a freshly initialised purifier, seeded."""

Stage = tuple[LossFn, Mapping[str, Any]]
"""One training stage: its loss and the keyword arguments of :func:`train_purifier`."""

#: the intra-op thread count trainings run with unless ``$HARNESS_TRAIN_THREADS`` says otherwise: the
#: 2 cores harness's CPU presets are sized for (what a default torch used there, so weights trained on
#: such a machine before the pin are reproduced by it)
TRAIN_THREADS = 2
TRAIN_THREADS_ENV = "HARNESS_TRAIN_THREADS"


def _train_threads() -> int:
    value = os.environ.get(TRAIN_THREADS_ENV, "").strip()
    if not value:
        return TRAIN_THREADS
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"${TRAIN_THREADS_ENV} must be a whole number >= 1, got {value!r}")
    return threads


def training_environment() -> dict[str, Any]:
    """What a training's floating-point results depend on besides its recipe: torch's version, the CPU
    capability its kernels dispatch to and the intra-op thread count (recorded in the provenance)."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


@contextlib.contextmanager
def reproducible_training() -> Iterator[dict[str, Any]]:
    """Run the block with the training thread count (:data:`TRAIN_THREADS` or ``$HARNESS_TRAIN_THREADS``)
    and ``torch.use_deterministic_algorithms`` (warn-only: CPU kernels without a deterministic variant
    warn instead of failing); yields :func:`training_environment`, and restores both afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(_train_threads())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield training_environment()
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear from ~0 to 1 over ``warmup_steps``, then cosine from 1 to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _batch(x_adv: torch.Tensor, x_clean: torch.Tensor, idx: torch.Tensor, generator: torch.Generator,
           augment_flip: bool, clean_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch: the same random horizontal flip on both images of a pair; with probability
    ``clean_fraction`` a pair's input is its clean image (a clean->clean pair)."""
    adv, clean = x_adv[idx], x_clean[idx]
    if augment_flip:
        flip = (torch.rand(len(idx), generator=generator) < 0.5).view(-1, 1, 1, 1)
        adv = torch.where(flip, adv.flip(-1), adv)
        clean = torch.where(flip, clean.flip(-1), clean)
    if clean_fraction > 0:
        use_clean = (torch.rand(len(idx), generator=generator) < clean_fraction).view(-1, 1, 1, 1)
        adv = torch.where(use_clean, clean, adv)
    return adv, clean


def train_purifier(model: nn.Module, x_adv: torch.Tensor, x_clean: torch.Tensor, loss_fn: LossFn, *,
                   epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int,
                   progress: bool = True, augment_flip: bool = True, clean_fraction: float = 0.0,
                   warmup_fraction: float = 0.05, grad_clip: float = 1.0) -> dict[str, float]:
    """Train ``model`` in place to map ``x_adv`` to ``x_clean``; returns summary metrics.

    Weight decay applies to matrices only (not to biases, norms or embeddings of rank < 2).
    """
    if x_adv.shape != x_clean.shape or len(x_adv) == 0:
        raise ValueError(f"need matching non-empty pairs, got {tuple(x_adv.shape)} and {tuple(x_clean.shape)}")
    if not 0.0 <= clean_fraction <= 1.0:
        raise ValueError(f"clean_fraction must be in [0, 1], got {clean_fraction}")
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(x_adv) / batch_size)
    total_steps = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(total_steps, max(1, round(warmup_fraction * total_steps))))
    model.train()
    start = time.perf_counter()
    epoch_loss = float("nan")
    with tqdm(total=total_steps, desc="train purifier", unit="step", disable=not progress) as bar:
        for epoch in range(epochs):
            running, seen = 0.0, 0
            for idx in torch.randperm(len(x_adv), generator=generator).split(batch_size):
                adv, clean = _batch(x_adv, x_clean, idx, generator, augment_flip, clean_fraction)
                loss = loss_fn(model, adv, clean, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                schedule.step()
                running += loss.item() * len(idx)
                seen += len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{running / seen:.4f}")
            epoch_loss = running / seen
            log.info("purifier epoch %d/%d: loss %.5f", epoch + 1, epochs, epoch_loss)
    model.eval()
    return {"final_epoch_loss": epoch_loss, "epochs": float(epochs), "steps": float(total_steps),
            "pairs": float(len(x_adv)), "train_seconds": time.perf_counter() - start}


def train_on_pairs(ctx: "TrainContext", new_model: ModelFactory,
                   stages: Sequence[Stage]) -> dict[str, torch.Tensor]:
    """A purifier entry's ``train`` recipe; returns the trained state dict (on the CPU).

    The PGD pairs of ``ctx.config["pairs"]`` (seed ``ctx.seed``, shared through ``ctx.artifacts``),
    ``new_model(ctx.config["model"], image_shape, ctx.seed + 1)``, then stage ``k`` of ``stages`` with
    seed ``ctx.seed + 2 + k``, all under :func:`reproducible_training`; ``ctx.metrics`` (the artifact's
    provenance) gets the training environment and each stage's metrics.
    """
    with reproducible_training() as environment:
        x_adv, x_clean = training_pairs(ctx, ctx.config["pairs"])
        model = new_model(ctx.config["model"], ctx.train_split.info.image_shape, ctx.seed + 1)
        stage_metrics = []
        for k, (loss_fn, settings) in enumerate(stages):
            metrics = train_purifier(model, x_adv, x_clean, loss_fn, seed=ctx.seed + 2 + k,
                                     progress=ctx.progress, **settings)
            log.info("%s training stage %d/%d: %s", ctx.entry_name, k + 1, len(stages), metrics)
            stage_metrics.append(metrics)
    ctx.metrics.update(training_environment=environment, stages=stage_metrics)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

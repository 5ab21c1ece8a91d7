"""The classifier training recipe.

SGD with Nesterov momentum, a one-cycle learning rate (linear warm-up from ``lr * lr_start`` to ``lr``
over the first ``warmup`` fraction of the steps, then linear decay to 0), label smoothing, weight decay
on conv/linear weights only, and batched tensor augmentation (a random horizontal flip, unless the
dataset's labels are not mirror-symmetric as for digits, and a random crop of the image reflect-padded
by ``crop_pad`` pixels). The model normalises its input with the dataset's channel statistics. For the
airbench-style conv nets the 2x2 stem is initialised as a patch-whitening filter bank computed from the
training images and kept frozen (its bias trains for the first ``whiten_bias_epochs`` epochs), as in
Keller Jordan's airbench CIFAR-10 speedruns, which speeds up early training a lot; the stem of a
1-channel net has too many filters for that and trains from its random initialisation.

All randomness (initial weights, subset selection, shuffling, augmentation) comes from ``seed``: the
initial weights are drawn under :func:`torch.random.fork_rng`, everything else from an explicit
:class:`torch.Generator`, so torch's global RNG state is left untouched.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from harness.data.catalog import DatasetInfo
from harness.core.errors import UsageError
from harness.core.keys import content_hash
from harness.classifiers.alignment import DEFAULT_ALIGN, LayerFeatures, ProjectionHead, alignment_loss, check_align
from harness.classifiers.architectures import ConvNet, architecture_registry, build_classifier, count_parameters
from harness.classifiers.checkpoint import TrainingCheckpoint
from harness.classifiers.objectives import DEFAULT_INNER, InnerAttack, check_objective, objective_loss

__all__ = ["CLASSIFIER_PRESETS", "DEFAULT_CONFIG", "ROBUST_DEFAULTS", "SyntheticData", "AlignmentTargets",
           "train_classifier", "evaluate_accuracy", "augment_batch"]

log = logging.getLogger(__name__)

DEFAULT_CONFIG: dict[str, Any] = {
    "arch": "convnet-small",
    "epochs": 10,
    "batch_size": 256,
    "lr": 0.4,  # peak learning rate (mean-reduced loss)
    "lr_start": 0.1,  # the warm-up starts at lr * lr_start
    "warmup": 0.2,  # fraction of the steps spent warming up
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,  # on conv/linear weights only
    "label_smoothing": 0.2,
    "augment": True,  # random horizontal flip + random crop
    "crop_pad": 4,  # reflect padding of the random crop, in pixels
    "bf16": False,  # CPU bfloat16 autocast for forward passes (weights stay float32)
    "channels_last": True,  # train in channels-last memory format (faster convolutions on CPU)
    "whiten_stem": True,  # airbench patch-whitening init of a ConvNet's stem (frozen weights)
    "whiten_bias_epochs": 3,  # epochs during which the whitened stem's bias trains
    "subset": None,  # train on this many randomly chosen training images (all when None)
    "eval_batch_size": 1000,
}

# Keys of the robust-training recipes (harness.classifiers.objectives / alignment). They are kept out of
# DEFAULT_CONFIG so that the standard presets, and so the recipe hashes of their cached weights, stay as
# they were; a config that leaves them out trains exactly as before.
ROBUST_DEFAULTS: dict[str, Any] = {
    "objective": "standard",  # standard | pgd-at | trades
    "inner": dict(DEFAULT_INNER),  # the inner attack of pgd-at / trades
    "beta": 6.0,  # the TRADES trade-off
    "ema": 0.0,  # weight EMA decay (0: off); the EMA weights are the trained model
    "synthetic_ratio": 0.0,  # share of each batch drawn from the synthetic set
    "align": dict(DEFAULT_ALIGN),  # the DRA term (lambda 0: off)
}

CLASSIFIER_PRESETS: dict[str, dict[str, Any]] = {
    # For tests: a ~75k-parameter conv net on at most 2,000 images; tens of seconds on 2 CPU cores.
    "tiny": {
        **DEFAULT_CONFIG,
        "arch": "convnet-tiny",
        "epochs": 8,
        "batch_size": 64,
        "lr": 0.1,
        "subset": 2000,
        "whiten_bias_epochs": 2,
    },
    # The CPU default: a 0.3M-parameter conv net on all 50k CIFAR-10 images.
    "small": {**DEFAULT_CONFIG},
    # The usual recipe of the papers (WRN-28-10, 200 epochs); far too slow for a CPU.
    "paper": {
        **DEFAULT_CONFIG,
        "arch": "wrn-28-10",
        "epochs": 200,
        "batch_size": 128,
        "lr": 0.1,
        "lr_start": 0.0,
        "warmup": 0.0,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "label_smoothing": 0.0,
        "whiten_stem": False,
    },
}


# ----------------------------------------------------------------------------------------------
# helpers


def _config(config: dict[str, Any]) -> dict[str, Any]:
    valid = {**DEFAULT_CONFIG, **ROBUST_DEFAULTS}
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise UsageError(f"unknown classifier config keys {unknown}; valid: {', '.join(valid)}")
    cfg = {**valid, **config}
    check_objective(cfg["objective"])
    cfg["align"] = check_align(cfg["align"])
    if cfg["objective"] != "standard":
        InnerAttack.from_config(cfg["inner"])  # a bad inner attack fails before training
    if not 0.0 <= float(cfg["synthetic_ratio"]) < 1.0:
        raise UsageError(f"classifier config synthetic_ratio must be in [0, 1), got {cfg['synthetic_ratio']}")
    if not 0.0 <= float(cfg["ema"]) < 1.0:
        raise UsageError(f"classifier config ema must be in [0, 1), got {cfg['ema']}")
    architecture_registry().info(cfg["arch"])  # an unknown name lists the valid ones
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if int(cfg[key]) < 1:
            raise UsageError(f"classifier config {key} must be at least 1, got {cfg[key]}")
    if cfg["subset"] is not None and int(cfg["subset"]) < 1:
        raise UsageError(f"classifier config subset must be positive or None, got {cfg['subset']}")
    if not 0.0 <= float(cfg["warmup"]) < 1.0:
        raise UsageError(f"classifier config warmup must be in [0, 1), got {cfg['warmup']}")
    return cfg


def _lr_factor(total_steps: int, warmup_steps: int, start: float):
    """One-cycle LR multiplier: linear ``start -> 1`` over ``warmup_steps``, then linear ``1 -> 0``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return start + (1.0 - start) * step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] (or float in [0, 1]) -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int, flip: bool = True) -> torch.Tensor:
    """Random horizontal flip (if ``flip``) and random crop of the ``pad``-pixel reflect-padded batch, vectorised."""
    n, c, h, w = x.shape
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x)
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy.view(-1, 1) + torch.arange(h)).view(n, 1, h, 1)
        cols = (dx.view(-1, 1) + torch.arange(w)).view(n, 1, 1, w)
        x = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    return x


@torch.no_grad()
def _whiten_stem(model: ConvNet, images: torch.Tensor, eps: float = 5e-4) -> bool:
    """Sets the 2x2 stem's weights to a patch-whitening filter bank (+/- each eigenvector scaled by
    1/sqrt(eigenvalue)) estimated on ``images``; returns False when the stem's shape does not fit."""
    weight = model.stem.weight
    c_out, c_in, kh, kw = weight.shape
    d = c_in * kh * kw
    if c_out != 2 * d:
        return False
    cov = torch.zeros(d, d, dtype=torch.float64)
    count = 0
    for i in range(0, len(images), 500):  # in chunks: the patches of 5,000 images take ~0.5 GB
        x = model.normalize(_to_float(images[i : i + 500]))
        patches = x.unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, d).double()
        cov += patches.T @ patches
        count += len(patches)
    cov /= count
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
    filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps).view(-1, 1)).view(d, c_in, kh, kw)
    weight.copy_(torch.cat([filters, -filters]).to(weight.dtype))
    return True


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
                      bf16: bool = False) -> float:
    """Top-1 accuracy of ``model`` (switched to eval mode) on uint8 or [0, 1] float ``images``."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = _to_float(images[i : i + batch_size])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        correct += (logits.argmax(1) == labels[i : i + batch_size].to(logits.device)).sum().item()
    return correct / max(1, len(images))


# ----------------------------------------------------------------------------------------------
# the training loop


@dataclass(frozen=True)
class SyntheticData:
    """Extra (e.g. diffusion-generated) training images mixed into every batch at ``synthetic_ratio``."""

    images: torch.Tensor  # uint8 (M, C, H, W)
    labels: torch.Tensor  # int64 (M,)


@dataclass(frozen=True)
class AlignmentTargets:
    """The per-image targets ``z`` of the alignment term: row ``i`` belongs to training image ``i`` (of
    the full training set, before any ``subset``) and ``synthetic`` row ``j`` to synthetic image ``j``."""

    real: torch.Tensor  # float (N, D)
    synthetic: torch.Tensor | None = None  # float (M, D)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, config: dict,
                     seed: int = 0, progress: bool = True, eval_images: torch.Tensor | None = None,
                     eval_labels: torch.Tensor | None = None,
                     dataset: DatasetInfo | None = None, *, synthetic: SyntheticData | None = None,
                     align_targets: AlignmentTargets | None = None,
                     checkpoint: str | os.PathLike | None = None) -> tuple[nn.Module, dict]:
    """Trains a classifier on ``images`` (uint8, ``(N, C, H, W)``) and ``labels`` (``(N,)`` ints).

    ``config`` holds keys of :data:`DEFAULT_CONFIG` and :data:`ROBUST_DEFAULTS` (missing ones take their
    values), e.g. a preset of :data:`CLASSIFIER_PRESETS`. ``dataset``, when given, supplies the input
    normalisation statistics and whether horizontal flips keep labels (without it: the architecture's
    default statistics, flips on). The loss is the config's ``objective`` (standard, PGD-AT or TRADES),
    plus the DRA alignment term when ``align.lambda > 0`` (which needs ``align_targets``); with
    ``synthetic_ratio > 0`` that share of every batch comes from ``synthetic``. An epoch is
    ``N // batch_size`` steps whatever the mix, so runs with and without synthetic data take equal steps.

    With ``checkpoint`` (a file path) the full training state is written there after every epoch and a
    run finding one resumes from it, ending with the same weights as an uninterrupted run.

    Returns the trained model (float32, eval mode, contiguous memory format, a plain
    :func:`build_classifier` module; the EMA weights when ``ema > 0``) and metrics: ``train_loss`` and
    ``train_accuracy`` (last epoch, on the training batches), ``eval_accuracy`` (when an eval set is
    given), ``seconds`` (training only, summed over resumed runs), ``eval_seconds``, ``epochs``, ``steps``,
    ``train_images``, ``synthetic_images``, ``images_per_second``, ``params``, ``resumed_from_epoch``.
    """
    cfg = _config(config)
    if images.dim() != 4 or len(images) != len(labels) or len(images) == 0:
        raise UsageError(f"need non-empty (N, C, H, W) images with one label each, got "
                         f"{tuple(images.shape)} images and {tuple(labels.shape)} labels")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UsageError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    if (eval_images is None) != (eval_labels is None):
        raise UsageError("give both eval_images and eval_labels, or neither")
    if dataset is not None and tuple(images.shape[1:]) != dataset.image_shape:
        raise UsageError(f"images of shape {tuple(images.shape[1:])} are not {dataset.name} images "
                         f"{dataset.image_shape}")
    ratio = float(cfg["synthetic_ratio"])
    if ratio > 0 and (synthetic is None or len(synthetic.labels) == 0):
        raise UsageError(f"synthetic_ratio {ratio} needs a synthetic training set")
    if synthetic is not None and tuple(synthetic.images.shape[1:]) != tuple(images.shape[1:]):
        raise UsageError(f"synthetic images of shape {tuple(synthetic.images.shape[1:])} do not match the "
                         f"training images {tuple(images.shape[1:])}")
    align = cfg["align"]
    lam = float(align["lambda"])
    if lam > 0:
        if align_targets is None or len(align_targets.real) != len(images):
            raise UsageError("the alignment term (align.lambda > 0) needs one target per training image")
        if ratio > 0 and (align_targets.synthetic is None or len(align_targets.synthetic) != len(synthetic.labels)):
            raise UsageError("the alignment term needs one target per synthetic image as well")
    stats = {"mean": dataset.mean, "std": dataset.std} if dataset is not None else {}
    flip = dataset.hflip if dataset is not None else True

    generator = torch.Generator().manual_seed(int(seed))
    real_targets = align_targets.real if lam > 0 else None
    if cfg["subset"] is not None and int(cfg["subset"]) < len(images):
        keep = torch.randperm(len(images), generator=generator)[: int(cfg["subset"])]
        images, labels = images[keep], labels[keep]
        real_targets = real_targets[keep] if real_targets is not None else None
    n = len(images)

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        model = build_classifier(cfg["arch"], num_classes, tuple(images.shape[1:]), **stats)
    model = model.float()

    whitened = False
    if cfg["whiten_stem"] and isinstance(model, ConvNet):
        sample = images[torch.randperm(n, generator=generator)[:5000]]
        whitened = _whiten_stem(model, sample)
        if whitened:
            model.stem.weight.requires_grad_(False)

    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)

    forward, head = None, None
    if lam > 0:
        features = LayerFeatures(model, align["layer"])
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(int(seed) + 1)
            head = ProjectionHead(features.dim(_to_float(images[:2])), int(real_targets.shape[1]),
                                  int(align["head_hidden"]), int(align["head_layers"]))
        forward = features
    trained = [p for p in model.parameters()] + (list(head.parameters()) if head is not None else [])
    decay = [p for p in trained if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in trained if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": float(cfg["weight_decay"])}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(cfg["lr"]), momentum=float(cfg["momentum"]), nesterov=bool(cfg["nesterov"]) and cfg["momentum"] > 0,
    )
    batch_size = min(int(cfg["batch_size"]), n)
    n_synthetic = round(batch_size * ratio)
    n_real = batch_size - n_synthetic
    steps_per_epoch = n // batch_size  # drop the last partial batch (keeps BN statistics sane)
    epochs = int(cfg["epochs"])
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(total_steps, round(float(cfg["warmup"]) * total_steps), float(cfg["lr_start"])))
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
        float(cfg["ema"])), use_buffers=True) if float(cfg["ema"]) > 0 else None)
    attack = InnerAttack.from_config(cfg["inner"]) if cfg["objective"] != "standard" else None
    bf16 = bool(cfg["bf16"])
    pad = int(cfg["crop_pad"]) if cfg["augment"] else 0
    synthetic_generator = torch.Generator().manual_seed(int(seed) + 2)
    synthetic_order: list[torch.Tensor] = []

    def synthetic_indices(count: int) -> torch.Tensor:
        """The next ``count`` synthetic images of an endless stream of shuffled passes."""
        taken = []
        while count > 0:
            if not synthetic_order or len(synthetic_order[0]) == 0:
                synthetic_order[:] = [torch.randperm(len(synthetic.labels), generator=synthetic_generator)]
            part, synthetic_order[0] = synthetic_order[0][:count], synthetic_order[0][count:]
            taken.append(part)
            count -= len(part)
        return torch.cat(taken)

    state = TrainingCheckpoint(checkpoint, tag=content_hash({"config": cfg, "seed": int(seed), "n": n}, 16))
    modules = {"model": model, "head": head, "ema": ema}
    first_epoch, seconds_before = 0, 0.0
    if state.exists():
        first_epoch, seconds_before = state.restore(modules, optimizer, scheduler,
                                                    {"main": generator, "synthetic": synthetic_generator},
                                                    synthetic_order)
        log.info("resuming training from epoch %d/%d (%s)", first_epoch, epochs, checkpoint)

    log.info("training %s (%d params, objective %s) on %d images for %d epochs (%d steps)", cfg["arch"],
             count_parameters(model), cfg["objective"], n, epochs, total_steps)
    start = time.perf_counter()
    train_loss = train_acc = float("nan")
    bar = tqdm(total=total_steps, initial=first_epoch * steps_per_epoch, desc=f"train {cfg['arch']}",
               unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    model.train()
    for epoch in range(first_epoch, epochs):
        if whitened and epoch >= int(cfg["whiten_bias_epochs"]):
            model.stem.bias.requires_grad_(False)
        order = torch.randperm(n, generator=generator)
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.long)
        for step in range(steps_per_epoch):
            idx = order[step * n_real : (step + 1) * n_real]
            x, y = _to_float(images[idx]), labels[idx]
            z = real_targets[idx] if real_targets is not None else None
            if n_synthetic:
                sidx = synthetic_indices(n_synthetic)
                x = torch.cat([x, _to_float(synthetic.images[sidx])])
                y = torch.cat([y, synthetic.labels[sidx].long()])
                if z is not None:
                    z = torch.cat([z, align_targets.synthetic[sidx]])
            if cfg["augment"]:
                x = augment_batch(x, generator, pad, flip)
            x = x.contiguous(memory_format=memory_format)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = objective_loss(cfg["objective"], model, x, y, attack=attack, beta=float(cfg["beta"]),
                                     label_smoothing=float(cfg["label_smoothing"]), generator=generator,
                                     forward=forward)
                loss = out.loss
                if head is not None:
                    u = out.adversarial_features if align["input"] == "adversarial" else out.clean_features
                    if u is None:  # the objective made no pass on those inputs (e.g. clean under pgd-at)
                        u = forward(x)[1]
                    loss = loss + alignment_loss(head(u.float()), z, lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.detach().double() * len(y)
            correct += (out.logits.detach().argmax(1) == y).sum()
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss.item():.3f}")
        seen = steps_per_epoch * batch_size
        train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen
        log.debug("epoch %d/%d: train loss %.4f, train accuracy %.4f", epoch + 1, epochs, train_loss, train_acc)
        state.save(epoch + 1, seconds_before + time.perf_counter() - start, modules, optimizer, scheduler,
                   {"main": generator, "synthetic": synthetic_generator}, synthetic_order)
    bar.close()
    seconds = seconds_before + time.perf_counter() - start

    final = ema.module if ema is not None else model
    if whitened:
        final.stem.weight.requires_grad_(True)
        final.stem.bias.requires_grad_(True)
    final = final.to(memory_format=torch.contiguous_format).float().eval()
    for p in final.parameters():
        p.requires_grad_(True)
    metrics: dict[str, Any] = {
        "arch": cfg["arch"],
        "objective": cfg["objective"],
        "params": count_parameters(final),
        "epochs": epochs,
        "steps": total_steps,
        "batch_size": batch_size,
        "train_images": n,
        "synthetic_images": len(synthetic.labels) if synthetic is not None and n_synthetic else 0,
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "seconds": seconds,
        "images_per_second": (epochs - first_epoch) * steps_per_epoch * batch_size
        / max(seconds - seconds_before, 1e-9),
        "resumed_from_epoch": first_epoch,
        # summation order, and so the last bits of the weights, follow the thread count and the CPU's vector
        # unit: a run reproduces bit for bit at the same torch version, threads and capability
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if eval_images is not None:
        t0 = time.perf_counter()
        metrics["eval_accuracy"] = evaluate_accuracy(final, eval_images, eval_labels.long(),
                                                     int(cfg["eval_batch_size"]))
        metrics["eval_seconds"] = time.perf_counter() - t0
    state.remove()
    return final, metrics

"""One batch of a cell, evaluated the same way by every executor: the attack under the cell's protocol,
the output checks, the purifier's image quality and the per-sample rows the driver stores."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch

from harness.attacks.base import Attack, perturbation_norm
from harness.core.entry import DefenseEntry, Kind
from harness.core.noise import FixedNoise
from harness.core.threat import ThreatModel
from harness.data import Split
from harness.evaluation.checks import batch_flags
from harness.evaluation.guards import check_batch
from harness.evaluation.metrics import batch_quality
from harness.evaluation.protocols import Protocol
from harness.evaluation.sharing import SharingDefense

__all__ = ["BatchResult", "CellWork", "evaluate_batch"]


@dataclass(frozen=True)
class CellWork:
    """What evaluating a cell's batches needs, on one device (the defense already checked and moved);
    ``data`` names the cell's images for the shared clean work, which ``share`` turns on."""

    entry: DefenseEntry
    protocol: Protocol
    threat: ThreatModel
    attack: Attack
    seed: int
    split: Split
    defense: SharingDefense
    device: torch.device
    data: Hashable = None
    share: bool = True


@dataclass(frozen=True)
class BatchResult:
    """A batch's per-sample rows (plain data), its image quality (CPU tensors, purifiers only), its
    seconds, and the evaluation-quality flags when it was the cell's first batch."""

    rows: list[dict[str, Any]]
    quality: dict[str, torch.Tensor] | None
    seconds: float
    flags: list[dict[str, Any]] | None = None


def _first_batch_flags(work: CellWork, x: torch.Tensor, y: torch.Tensor,
                       indices: torch.Tensor) -> list[dict[str, Any]]:
    """The evaluation-quality flags (:mod:`harness.evaluation.checks`) of a cell's first batch: the
    defense as the cell evaluates it (its fixed noise) and what the cell's attack differentiates."""
    noise = FixedNoise(work.seed, namespace="defense")
    target = work.protocol.target(work.entry, work.defense, work.seed)
    flags = batch_flags(lambda images: work.defense(images, noise.draws(indices)), target, x, y, indices)
    return [flag.describe() for flag in flags]


def evaluate_batch(work: CellWork, batch: Sequence[int], flags: bool = False) -> BatchResult:
    """Evaluate the samples ``batch`` (dataset indices) of the cell; ``flags``: also run the first-batch
    checks. Tensors live on ``work.device``; what is returned is on the CPU."""
    started = time.time()
    indices = torch.tensor(list(batch))
    x = work.split.float_images(indices).to(work.device)
    y = work.split.labels[indices].to(work.device)
    found = _first_batch_flags(work, x, y, indices) if flags else None
    if any(flag.get("name") == "randomness" for flag in found or ()):
        work.defense.stop_sharing()
    quality = None
    with work.defense.sharing(x, work.data, enabled=work.share):
        result = work.protocol.run(work.entry, work.defense, work.attack, x, y, indices, work.seed)
        norms = perturbation_norm(result.x_adv, x, work.threat.norm)
        check_batch(result.x_adv, x, work.threat, norms)
        if work.entry.kind is Kind.PURIFIER:
            measured = batch_quality(work.defense, x, result.x_adv, FixedNoise(work.seed, namespace="defense"),
                                     indices)
            quality = {name: values.detach().cpu() for name, values in measured.items()}
    extras = result.extra or [None] * len(batch)
    rows = [{"sample_index": int(i), "label": int(lab), "clean_pred": int(c), "adv_pred": int(a),
             "perturbation": float(p), "extra": e}
            for i, lab, c, a, p, e in zip(batch, y.tolist(), result.clean_pred.tolist(), result.adv_pred.tolist(),
                                          norms.tolist(), extras)]
    return BatchResult(rows, quality, time.time() - started, found)

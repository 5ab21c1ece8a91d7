"""Adversarial/clean training pairs for purifiers trained with a purification loss.

DISCO (Ho & Vasconcelos, "DISCO: Adversarial Defense with Local Implicit Functions", NeurIPS 2022) and
MAEP (Chen & Lu 2025, arXiv:2501.16904) train on pairs ``(x_adv, x)``: ``x_adv`` is a PGD-linf attack
(Madry et al., ICLR 2018) on the frozen base classifier, on a seeded random subset of the training split.

The pairs are an artifact of their own (kind ``pairs``), keyed by what determines them: the classifier's
weights, the training split, the attack settings, the number of pairs and the seed. Every recipe with
the same pair settings (``maep``, ``disco``, the MAEP ablations) computes them once and reuses them.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn
from tqdm import tqdm

from harness.attacks.base import Target
from harness.attacks.pgd import PGD
from harness.core.keys import module_fingerprint
from harness.core.threat import Epsilon, ThreatModel

if TYPE_CHECKING:  # pragma: no cover - typing only
    from harness.core.context import TrainContext
    from harness.data import Split

__all__ = ["PAIRS_KIND", "adversarial_pairs", "pairs_recipe", "training_pairs"]

log = logging.getLogger(__name__)

PAIRS_KIND = "pairs"
PAIRS_VERSION = "1"  # bump when the generation below changes its output


def _resolve_n(n: int | None, split: "Split") -> int:
    """``n`` pairs, at most the whole split; ``None`` means the whole split."""
    total = len(split.labels)
    return total if n is None else min(int(n), total)


def pairs_recipe(classifier: nn.Module, split: "Split", *, n: int, eps: float | str, steps: int,
                 step_size: float | str, batch_size: int, seed: int) -> dict[str, Any]:
    """What determines a set of pairs: the key of their artifact."""
    return {"what": "pgd-pairs", "version": PAIRS_VERSION, "classifier": module_fingerprint(classifier),
            "dataset": split.info.name, "split": split.split, "train_fingerprint": split.fingerprint,
            "attack": {"norm": "linf", "eps": Epsilon.parse(eps).value, "steps": int(steps),
                       "step_size": Epsilon.parse(step_size).value, "random_start": True},
            "n": int(n), "batch_size": int(batch_size), "seed": int(seed)}


def _generate(classifier: nn.Module, split: "Split", *, n: int, eps: float | str, steps: int,
              step_size: float | str, batch_size: int, seed: int, progress: bool) -> dict[str, torch.Tensor]:
    """``{"indices": (n,) int64, "x_adv": (n, C, H, W) float32}`` for ``n`` training images drawn at random."""
    total = len(split.labels)
    if not 0 < n <= total:
        raise ValueError(f"n must be in 1..{total} (the size of the split), got {n}")
    indices = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    attack = PGD(ThreatModel("linf", Epsilon.parse(eps)), steps=steps,
                 step_size=Epsilon.parse(step_size).value, random_start=True)
    target = Target(lambda x, _indices: classifier(x))
    was_training = classifier.training
    classifier.eval()
    adv_batches = []
    start = time.perf_counter()
    try:
        for chunk in tqdm(indices.split(batch_size), desc=f"PGD-{steps} pairs", unit="batch",
                          disable=not progress):
            x = split.float_images(chunk)
            y = torch.as_tensor(split.labels[chunk], dtype=torch.long)
            adv_batches.append(attack.perturb(target, x, y, chunk, seed))
    finally:
        classifier.train(was_training)
    log.info("generated %d PGD-%d pairs (eps %s) in %.0f s", n, steps, eps, time.perf_counter() - start)
    return {"indices": indices, "x_adv": torch.cat(adv_batches)}


def adversarial_pairs(classifier: nn.Module, split: "Split", *, n: int, eps: float | str, steps: int,
                      step_size: float | str, batch_size: int, seed: int,
                      progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_adv, x_clean)``, float32 ``(n, C, H, W)`` in [0, 1], for ``n`` training images drawn at random.

    The subset comes from a generator seeded with ``seed``; PGD's random start is seeded per image
    from ``seed`` and its dataset index, so the pairs do not depend on ``batch_size``. ``eps`` and
    ``step_size`` may be given as text such as ``"8/255"``. The global RNG is not used.
    """
    pairs = _generate(classifier, split, n=n, eps=eps, steps=steps, step_size=step_size,
                      batch_size=batch_size, seed=seed, progress=progress)
    return pairs["x_adv"], split.float_images(pairs["indices"])


def training_pairs(ctx: "TrainContext", settings: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of a train recipe: ``settings`` (``n``, ``eps``, ``steps``, ``step_size``,
    ``batch_size``; ``n`` None or above the split's size means the whole split) on ``ctx.train_split``
    against ``ctx.classifier``, seeded with ``ctx.seed``.

    With ``ctx.artifacts`` they are looked up in (or computed once into) the artifact cache; without
    it they are computed here. Both give the same tensors.
    """
    split = ctx.train_split
    options = dict(settings, n=_resolve_n(settings["n"], split), seed=ctx.seed)
    if ctx.artifacts is None:
        return adversarial_pairs(ctx.classifier, split, progress=ctx.progress, **options)
    recipe = pairs_recipe(ctx.classifier, split, **options)
    artifact = ctx.artifacts.get_or_train(
        PAIRS_KIND, recipe, lambda: _generate(ctx.classifier, split, progress=ctx.progress, **options),
        what=f"{options['n']} PGD-{options['steps']} training pairs")
    pairs = artifact.load()
    return pairs["x_adv"], split.float_images(pairs["indices"])

"""Adversarial/clean training pairs for purifiers trained with a purification loss.

DISCO (Ho & Vasconcelos, "DISCO: Adversarial Defense with Local Implicit Functions", NeurIPS 2022) and
MAEP (Chen & Lu 2025, arXiv:2501.16904) train on pairs ``(x_adv, x)``: ``x_adv`` is a PGD-linf attack
(Madry et al., ICLR 2018) on the frozen base classifier. The pairs belong to one training recipe and
are generated inside it, on a seeded random subset of the training split.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from harness.attacks.base import Target
from harness.attacks.pgd import PGD
from harness.threat import Epsilon, ThreatModel

if TYPE_CHECKING:  # pragma: no cover - typing only
    from harness.data import Split

__all__ = ["adversarial_pairs"]

log = logging.getLogger(__name__)


def adversarial_pairs(classifier: nn.Module, split: "Split", *, n: int, eps: float | str, steps: int,
                      step_size: float | str, batch_size: int, seed: int,
                      progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_adv, x_clean)``, float32 ``(n, C, H, W)`` in [0, 1], for ``n`` training images drawn at random.

    The subset comes from a generator seeded with ``seed``; PGD's random start is seeded per image
    from ``seed`` and its dataset index, so the pairs do not depend on ``batch_size``. ``eps`` and
    ``step_size`` may be given as text such as ``"8/255"``. The global RNG is not used.
    """
    total = len(split.labels)
    if not 0 < n <= total:
        raise ValueError(f"n must be in 1..{total} (the size of the split), got {n}")
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(total, generator=generator)[:n]
    attack = PGD(ThreatModel("linf", Epsilon.parse(eps)), steps=steps,
                 step_size=Epsilon.parse(step_size).value, random_start=True)
    target = Target(lambda x, _indices: classifier(x))
    was_training = classifier.training
    classifier.eval()
    adv_batches, clean_batches = [], []
    start = time.perf_counter()
    try:
        for chunk in tqdm(indices.split(batch_size), desc=f"PGD-{steps} pairs", unit="batch",
                          disable=not progress):
            x = split.float_images(chunk)
            y = torch.as_tensor(split.labels[chunk], dtype=torch.long)
            adv_batches.append(attack.perturb(target, x, y, chunk, seed))
            clean_batches.append(x)
    finally:
        classifier.train(was_training)
    log.info("generated %d PGD-%d pairs (eps %s) in %.0f s", n, steps, eps, time.perf_counter() - start)
    return torch.cat(adv_batches), torch.cat(clean_batches)

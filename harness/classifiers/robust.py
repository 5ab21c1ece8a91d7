"""Train a classifier entry's own network on a dataset split: the standard or a robust recipe, with
optional synthetic images and alignment targets (see :func:`harness.classifiers.training.train_classifier`)."""

from __future__ import annotations

import os
from typing import Any, Mapping, Protocol

import torch
from torch import nn

from harness.classifiers.training import AlignmentTargets, SyntheticData, train_classifier
from harness.data import Split

__all__ = ["LabelledImages", "train_robust_classifier"]


class LabelledImages(Protocol):
    """Anything with uint8 ``images`` (N, C, H, W) and int64 ``labels`` (N,), e.g. a synthetic set."""

    images: torch.Tensor
    labels: torch.Tensor


def train_robust_classifier(split: Split, config: Mapping[str, Any], *, seed: int = 0, progress: bool = True,
                            synthetic: LabelledImages | None = None,
                            align_targets: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                            checkpoint: str | os.PathLike | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train on ``split`` (its normalisation and flip rule) with ``config``; ``align_targets`` are the
    per-image DRA targets of the split's images and of the synthetic ones. Returns the model and metrics."""
    return train_classifier(
        split.images, split.labels, split.info.num_classes, dict(config), seed=seed, progress=progress,
        dataset=split.info,
        synthetic=SyntheticData(synthetic.images, synthetic.labels) if synthetic is not None else None,
        align_targets=AlignmentTargets(*align_targets) if align_targets is not None else None,
        checkpoint=checkpoint)

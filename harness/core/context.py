"""What a defense entry is handed when it is built or trained."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from harness.core.artifacts import ArtifactCache

if TYPE_CHECKING:  # pragma: no cover - typing only
    from harness.data import DatasetInfo, Split

__all__ = ["BuildContext", "TrainContext"]


@dataclass
class TrainContext:
    """Inputs of an entry's ``train`` recipe.

    ``train_split`` is the split the entry trains on; ``classifier`` the frozen base classifier for
    purifiers (whose training data may be attacks on it, e.g. PGD pairs), ``None`` for an entry of kind
    classifier, which trains its own network.
    """

    entry_name: str
    config: Mapping[str, Any]
    train_split: "Split"
    classifier: nn.Module | None
    seed: int = 0
    progress: bool = True
    artifacts: ArtifactCache | None = None  # for recipes that share artifacts (e.g. one DDPM per dataset)
    checkpoint: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None  # where datasets live (for recipes that load more data, e.g. a DDPM's)


@dataclass
class BuildContext:
    """Inputs of an entry's ``build``: the dataset, the preset's config, the validated options, the
    entry's trained weights (``weights()``, trained first if needed) and, for purifiers and the undefended
    entry, the frozen base classifier (``None`` for an entry of kind classifier)."""

    entry_name: str
    dataset: "DatasetInfo"
    classifier: nn.Module | None
    preset: str | None
    config: Mapping[str, Any]
    options: Mapping[str, Any]
    weights: Callable[[], dict[str, torch.Tensor]]
    artifacts: ArtifactCache | None = None

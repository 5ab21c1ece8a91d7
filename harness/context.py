"""What a defense entry is handed when it is built or trained."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from harness.artifacts import ArtifactCache
from harness.data import DatasetInfo, Split

__all__ = ["BuildContext", "TrainContext"]


@dataclass
class TrainContext:
    """Inputs of an entry's ``train`` recipe.

    ``train_split`` is the split the entry trains on; ``classifier`` the frozen base classifier (for
    entries whose training data are attacks on it, such as purifiers trained on PGD pairs).
    """

    entry_name: str
    config: Mapping[str, Any]
    train_split: Split
    classifier: nn.Module
    seed: int = 0
    progress: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    artifacts: ArtifactCache | None = None  # for recipes that share artifacts (e.g. one DDPM per dataset)


@dataclass
class BuildContext:
    """Inputs of an entry's ``build``: the base classifier, the dataset and the entry's weights."""

    entry_name: str
    dataset: DatasetInfo
    classifier: nn.Module
    preset: str | None
    config: Mapping[str, Any]
    options: Mapping[str, Any]
    weights: Callable[[], dict[str, torch.Tensor]]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    artifacts: ArtifactCache | None = None

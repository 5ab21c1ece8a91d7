"""Turn a registered entry into a ready :class:`~harness.registry.Defense`, training its weights on
demand (cached under the hash of the recipe: entry@version, preset, classifier, training data, seed)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from harness.artifacts import Artifact, ArtifactCache
from harness.classifiers import LoadedClassifier
from harness.context import BuildContext, TrainContext
from harness.data import DatasetInfo, load_split
from harness.errors import UsageError
from harness.registry import Defense, DefenseEntry


def resolve_preset(entry: DefenseEntry, preset: str | None) -> str | None:
    """The preset to use: the requested one if the entry has presets, else its default."""
    if not entry.presets:
        return None
    if preset is not None and preset not in entry.presets:
        raise UsageError(f"defense {entry.name!r} has no preset {preset!r}; valid: {', '.join(entry.presets)}")
    return preset or entry.default_preset


def defense_recipe(entry: DefenseEntry, preset: str | None, classifier: LoadedClassifier,
                   dataset: str, train_fingerprint: str, seed: int) -> dict[str, Any]:
    return {"what": "defense", "entry": entry.name, "version": entry.version, "preset": preset,
            "config": entry.preset_config(preset), "classifier": classifier.id, "dataset": dataset,
            "train_fingerprint": train_fingerprint, "seed": seed}


def train_defense_weights(entry: DefenseEntry, preset: str | None, classifier: LoadedClassifier,
                          dataset: DatasetInfo, artifacts: ArtifactCache, *,
                          data_root: str | None = None, progress: bool = True,
                          seed: int = 0) -> Artifact:
    """The entry's trained weights for ``preset``: cached, or trained now if allowed."""
    if entry.train is None:
        raise UsageError(f"defense {entry.name!r} has nothing to train")
    train_split = load_split(dataset.name, "train", data_root)
    recipe = defense_recipe(entry, preset, classifier, dataset.name, train_split.fingerprint, seed)
    train_ctx = TrainContext(entry_name=entry.name, config=recipe["config"], train_split=train_split,
                             classifier=classifier.model, seed=seed, progress=progress,
                             artifacts=artifacts)
    return artifacts.get_or_train(f"defense/{entry.name}", recipe, lambda: entry.train(train_ctx),
                                  what=f"defense {entry.name!r} (preset {preset})")


def build_defense(entry: DefenseEntry, preset: str | None, classifier: LoadedClassifier,
                  dataset: DatasetInfo, artifacts: ArtifactCache, *, options: Mapping[str, Any] | None = None,
                  data_root: str | None = None, progress: bool = True, seed: int = 0) -> Defense:
    """Build ``entry`` around ``classifier``; its weights are trained on first use."""
    if dataset.name not in entry.datasets:
        raise UsageError(f"defense {entry.name!r} does not support dataset {dataset.name!r}; "
                         f"valid: {', '.join(entry.datasets)}")

    def weights() -> dict[str, torch.Tensor]:
        return train_defense_weights(entry, preset, classifier, dataset, artifacts,
                                     data_root=data_root, progress=progress, seed=seed).load()

    ctx = BuildContext(entry_name=entry.name, dataset=dataset, classifier=classifier.model,
                       preset=preset, config=entry.preset_config(preset), options=dict(options or {}),
                       weights=weights, artifacts=artifacts)
    defense = entry.build(ctx)
    if not isinstance(defense, Defense):
        raise TypeError(f"defense {entry.name!r}: build() must return a harness.registry.Defense")
    defense.eval()
    for p in defense.parameters():
        p.requires_grad_(False)
    return defense

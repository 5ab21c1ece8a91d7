"""Turn a registered entry into a ready :class:`~harness.registry.Defense`, training its weights on
demand (cached under the hash of the recipe: entry@version, preset, classifier, training data, seed).

:func:`build_transferred_defense` puts a purifier trained on one dataset in front of another
dataset's classifier (defense transfer, MAEP paper Tables 7-9)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from harness.artifacts import Artifact, ArtifactCache
from harness.classifiers import LoadedClassifier
from harness.context import BuildContext, TrainContext
from harness.data import DatasetInfo, load_split
from harness.errors import UsageError
from harness.registry import Defense, DefenseEntry, Kind
from harness.transfer import ShapeAdapter


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
    entry.check_dataset(dataset.name)

    def weights() -> dict[str, torch.Tensor]:
        return train_defense_weights(entry, preset, classifier, dataset, artifacts,
                                     data_root=data_root, progress=progress, seed=seed).load()

    ctx = BuildContext(entry_name=entry.name, dataset=dataset, classifier=classifier.model,
                       preset=preset, config=entry.preset_config(preset), options=dict(options or {}),
                       weights=weights, artifacts=artifacts)
    defense = entry.build(ctx)
    if not isinstance(defense, Defense):
        raise TypeError(f"defense {entry.name!r}: build() must return a harness.registry.Defense")
    return _frozen(defense)


def check_transferable(entry: DefenseEntry, train_dataset: str) -> None:
    """Only purifiers transfer (a robust classifier *is* the classifier), from a dataset they support."""
    if entry.kind is not Kind.PURIFIER:
        raise UsageError(f"defense {entry.name!r} is a {entry.kind.value}, not a purifier: only purifiers "
                         f"can be trained on one dataset and evaluated on another")
    entry.check_dataset(train_dataset, role="trained on")


def build_transferred_defense(entry: DefenseEntry, preset: str | None, source_classifier: LoadedClassifier,
                              source_dataset: DatasetInfo, target_classifier: LoadedClassifier,
                              target_dataset: DatasetInfo, artifacts: ArtifactCache, *,
                              options: Mapping[str, Any] | None = None, data_root: str | None = None,
                              progress: bool = True, seed: int = 0) -> Defense:
    """``entry``'s purifier as trained on ``source_dataset`` (against ``source_classifier``), adapted to
    the image shape of ``target_dataset`` and placed in front of ``target_classifier``."""
    check_transferable(entry, source_dataset.name)
    source = build_defense(entry, preset, source_classifier, source_dataset, artifacts, options=options,
                           data_root=data_root, progress=progress, seed=seed)
    purifier = ShapeAdapter(source.purifier, source_dataset.image_shape, target_dataset.image_shape)
    return _frozen(Defense(target_classifier.model, purifier))


def _frozen(defense: Defense) -> Defense:
    defense.eval()
    for p in defense.parameters():
        p.requires_grad_(False)
    return defense

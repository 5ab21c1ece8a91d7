"""Turn a registered entry into a ready :class:`~harness.core.entry.Defense`, training its weights on
demand (cached under the hash of the recipe: entry@version, preset, base classifier for purifiers,
training data, seed).

A purifier (and the undefended entry) is built around the run's base classifier. An entry of kind
classifier owns its network: :func:`own_network` names it, by its recipe when harness trains it and by a
fingerprint of the built module (class and state) when the entry loads it itself.
:func:`build_transferred_defense` puts a purifier trained on one dataset in front of another dataset's
classifier (defense transfer, MAEP paper Tables 7-9).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from harness.classifiers.sources import LoadedClassifier
from harness.core.artifacts import Artifact, ArtifactCache, recipe_hash
from harness.core.context import BuildContext, TrainContext
from harness.core.entry import Defense, DefenseEntry, Kind
from harness.core.errors import UsageError
from harness.core.keys import content_hash, module_fingerprint, state_fingerprint
from harness.data import DatasetInfo, load_split
from harness.toolkit.transfer import ShapeAdapter

__all__ = ["OwnNetwork", "defense_recipe", "train_defense_weights", "training_record", "build_defense", "own_network",
           "check_transferable", "build_transferred_defense", "weights_fingerprint"]


def defense_recipe(entry: DefenseEntry, preset: str | None, classifier: LoadedClassifier | None,
                   dataset: str, train_fingerprint: str, seed: int) -> dict[str, Any]:
    """What an entry's trained weights depend on (their artifact key hashes exactly this)."""
    return {"what": "defense", "entry": entry.name, "version": entry.version, "preset": preset,
            "config": entry.preset_config(preset), "classifier": classifier.id if classifier else None,
            "dataset": dataset, "train_fingerprint": train_fingerprint, "seed": seed}


def _base(entry: DefenseEntry, classifier: LoadedClassifier | None) -> LoadedClassifier | None:
    """The base classifier an entry is handed: the run's for purifiers, none for classifier entries."""
    if not entry.uses_base_classifier:
        return None
    if classifier is None:
        raise ValueError(f"defense {entry.name!r} ({entry.kind.value}) needs the run's base classifier")
    return classifier


def train_defense_weights(entry: DefenseEntry, preset: str | None, classifier: LoadedClassifier | None,
                          dataset: DatasetInfo, artifacts: ArtifactCache, *,
                          data_root: str | None = None, progress: bool = True,
                          seed: int = 0) -> Artifact:
    """The entry's trained weights for ``preset``: cached, or trained now if allowed."""
    if entry.train is None:
        raise UsageError(f"defense {entry.name!r} has nothing to train")
    base = _base(entry, classifier)
    train_split = load_split(dataset.name, "train", data_root)
    recipe = defense_recipe(entry, preset, base, dataset.name, train_split.fingerprint, seed)
    kind = f"defense/{entry.name}"
    train_ctx = TrainContext(entry_name=entry.name, config=recipe["config"], train_split=train_split,
                             classifier=base.model if base else None, seed=seed, progress=progress,
                             artifacts=artifacts, checkpoint=artifacts.checkpoint_path(kind, recipe),
                             data_root=data_root)
    return artifacts.get_or_train(kind, recipe, lambda: entry.train(train_ctx),
                                  what=f"defense {entry.name!r} (preset {preset})",
                                  provenance=lambda: train_ctx.metrics)


def training_record(network: "OwnNetwork", artifacts: ArtifactCache) -> dict[str, Any] | None:
    """What the training of a harness-trained classifier entry recorded (its cost, its metrics), read
    from its artifact once it exists; None for a network harness did not train, or not trained yet."""
    key = network.provenance.get("artifact_key")
    if key is None:
        return None
    artifact = artifacts.find(f"defense/{network.provenance['entry']}", network.provenance["recipe"])
    return artifact.provenance() if artifact is not None else None


def build_defense(entry: DefenseEntry, preset: str | None, classifier: LoadedClassifier | None,
                  dataset: DatasetInfo, artifacts: ArtifactCache, *, options: Mapping[str, Any] | None = None,
                  data_root: str | None = None, progress: bool = True, seed: int = 0) -> Defense:
    """Build ``entry`` (around ``classifier`` if it uses the base classifier); its weights are trained
    on first use. ``options`` must be validated already (:meth:`DefenseEntry.check_options`)."""
    entry.check_dataset(dataset.name)
    base = _base(entry, classifier)

    def weights() -> dict[str, torch.Tensor]:
        return train_defense_weights(entry, preset, base, dataset, artifacts,
                                     data_root=data_root, progress=progress, seed=seed).load()

    ctx = BuildContext(entry_name=entry.name, dataset=dataset, classifier=base.model if base else None,
                       preset=preset, config=entry.preset_config(preset), options=dict(options or {}),
                       weights=weights, artifacts=artifacts)
    defense = entry.build(ctx)
    if not isinstance(defense, Defense):
        raise TypeError(f"defense {entry.name!r}: build() must return a harness Defense")
    if entry.kind is not Kind.PURIFIER and defense.has_purifier:
        raise TypeError(f"defense {entry.name!r} is a {entry.kind.value} entry but built a purifier: "
                        f"declare kind=Kind.PURIFIER")
    return _frozen(defense)


@dataclass(frozen=True)
class OwnNetwork:
    """The network of an entry of kind classifier: the id that names it in cell keys, its provenance,
    and the defense when naming it meant building it."""

    id: str
    provenance: dict[str, Any]
    defense: Defense | None = field(default=None, compare=False)


def own_network(entry: DefenseEntry, preset: str | None, dataset: DatasetInfo, artifacts: ArtifactCache, *,
                options: Mapping[str, Any] | None = None, data_root: str | None = None,
                progress: bool = True, seed: int = 0) -> OwnNetwork:
    """Name the network of a classifier entry without training it if harness trains it (by recipe
    hash); otherwise build it and fingerprint the module it loaded (class and every tensor)."""
    if entry.train is not None:
        train_split = load_split(dataset.name, "train", data_root)
        recipe = defense_recipe(entry, preset, None, dataset.name, train_split.fingerprint, seed)
        key = recipe_hash(recipe)
        return OwnNetwork(f"{entry.name}:{preset}@{key}", {"source": "entry", "entry": entry.name,
                                                         "recipe": recipe, "artifact_key": key})
    defense = build_defense(entry, preset, None, dataset, artifacts, options=options, data_root=data_root,
                            progress=progress, seed=seed)
    network = defense.classifier
    fingerprint = module_fingerprint(network)
    cls = f"{type(network).__module__}.{type(network).__qualname__}"
    return OwnNetwork(f"{entry.name}@{fingerprint}", {"source": "entry", "entry": entry.name, "module": cls,
                                                      "fingerprint": fingerprint}, defense)


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


#: the fingerprints of the defenses built in this process (built defenses are frozen: computed once each)
_FINGERPRINTS: "weakref.WeakKeyDictionary[Defense, dict[str, str]]" = weakref.WeakKeyDictionary()


def weights_fingerprint(defense: Defense) -> dict[str, str]:
    """Content hashes of the weights a cell evaluates (:func:`~harness.core.keys.state_fingerprint` of
    the state dicts: names, dtypes, shapes and bytes): ``classifier``, ``purifier`` (an empty state for
    no purifier) and ``defense``, the hash of both. Equal recipes that trained different weights show here,
    so ``harness verify`` can tell "other weights" from "other results"."""
    if defense not in _FINGERPRINTS:
        parts = {"classifier": state_fingerprint(defense.classifier.state_dict()),
                 "purifier": state_fingerprint(defense.purifier.state_dict())}
        _FINGERPRINTS[defense] = {"defense": content_hash(parts, 16), **parts}
    return dict(_FINGERPRINTS[defense])

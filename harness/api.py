"""harness's one import surface: the plugin contract, the building blocks first-party entries use, and
:func:`evaluate`, the Python entry to the same runner as ``harness run``.

Plugin authors import everything from here (``from harness.api import DefenseEntry, Kind, Purifier``);
notebooks call ``harness.evaluate(model, dataset="cifar10", eps="8/255")`` (RobustBench's
``benchmark()`` in spirit) and get a pandas DataFrame of cells, stored in the same results DB, with the
same keys, provenance and resume as the command line.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
from sqlalchemy.engine import Engine
from torch import nn

from harness.attacks.base import Attack, Target, perturbation_norm, project
from harness.attacks.catalog import attack_registry, parse_attack_spec
from harness.classifiers.architectures import build_classifier, count_parameters, penultimate_features
from harness.classifiers.robust import train_robust_classifier
from harness.classifiers.sources import DEFAULT_CLASSIFIER, LoadedClassifier, save_classifier
from harness.classifiers.sources import _from_robustbench as robustbench_classifier, import_robustbench
from harness.core.artifacts import ArtifactCache
from harness.core.context import BuildContext, TrainContext
from harness.core.entry import (Defense, DefenseEntry, ExtraData, Identity, Kind, Metadata, Option, Purifier, Reported,
                                Role, defense_registry)
from harness.core.errors import MissingArtifactError, UsageError
from harness.core.noise import FixedNoise, FreshNoise, NoiseDraws
from harness.core.registry import Registry
from harness.core.threat import Epsilon, ThreatModel
from harness.data import DatasetInfo, Split, dataset_info, load_split
from harness.evaluation.protocols import Protocol, protocol_registry
from harness.evaluation.runner import DEFAULT_ATTACKS, DEFAULT_PROTOCOLS, RunRequest, check_request, run_grid
from harness.results.database import open_db
from harness.toolkit.diffusion import (DiffusionPurifier, LoadedUNet, build_unet, checkpointed, ddpm_preset,
                                       diffusion_options, load_entry_unet, shared_ddpm, train_entry_ddpm)
from harness.toolkit.diffusion.features import (DiffusionFeatures, cached_features, feature_blocks,
                                               load_feature_ddpm, pinned_noise)
from harness.toolkit.diffusion.purifier import ReversePurifier, entry_build
from harness.toolkit.synthetic import SyntheticSet, synthetic_set
from harness.toolkit.pairs import adversarial_pairs, training_pairs
from harness.toolkit.purifier_training import LossFn, Stage, train_on_pairs, train_purifier
from harness.toolkit.transfer import ShapeAdapter

__all__ = [
    # the contract
    "Defense", "DefenseEntry", "ExtraData", "Identity", "Kind", "Metadata", "Option", "Purifier", "Reported", "Role",
    "BuildContext", "TrainContext", "NoiseDraws", "FixedNoise", "FreshNoise", "Epsilon", "ThreatModel",
    "UsageError", "MissingArtifactError", "Registry", "ArtifactCache", "DatasetInfo", "Split",
    # other axes
    "Attack", "Target", "project", "perturbation_norm", "attack_registry", "Protocol", "protocol_registry",
    "defense_registry",
    # building blocks
    "train_on_pairs", "train_purifier", "training_pairs", "adversarial_pairs", "LossFn", "Stage", "ShapeAdapter",
    "DiffusionPurifier", "ReversePurifier", "entry_build", "diffusion_options", "train_entry_ddpm",
    "load_entry_unet", "shared_ddpm", "build_unet", "ddpm_preset", "checkpointed", "LoadedUNet",
    "build_classifier", "count_parameters", "penultimate_features", "train_robust_classifier", "save_classifier", "LoadedClassifier", "dataset_info", "load_split",
    "synthetic_set", "SyntheticSet",
    "robustbench_classifier", "import_robustbench",
    "DiffusionFeatures", "cached_features", "feature_blocks", "load_feature_ddpm", "pinned_noise",
    # evaluation
    "evaluate", "module_entry", "OUTCOME_COLUMNS",
]

OUTCOME_COLUMNS = ("key", "defense", "train_dataset", "variant", "protocol", "answers", "attack", "eps", "seed",
                   "clean_acc", "robust_acc", "status", "error", "note")


def module_entry(model: nn.Module, name: str | None = None) -> DefenseEntry:
    """An ad-hoc classifier entry for ``model`` (images in [0, 1] -> logits). Its cells are keyed by a
    fingerprint of the module (class and every tensor), so the same weights resume the same cells."""
    slug = name or re.sub(r"[^A-Za-z0-9_-]+", "-", type(model).__name__).strip("-").lower() or "module"
    return DefenseEntry(name=slug, version="1", kind=Kind.CLASSIFIER, paper=f"ad-hoc module {type(model).__name__}",
                        citation="-", build=lambda ctx: Defense(model),
                        description="An nn.Module evaluated through harness.evaluate().")


def _many(value: Any, kinds: tuple[type, ...]) -> list[Any]:
    return [value] if isinstance(value, kinds) else list(value)


def _eps_text(value: str | float) -> str:
    return value if isinstance(value, str) else repr(float(value))


def _attack(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    return parse_attack_spec(spec) if isinstance(spec, str) else dict(spec)


def evaluate(model_or_entry: nn.Module | DefenseEntry | str | Sequence[nn.Module | DefenseEntry | str], *,
             dataset: str = "cifar10", threat: str = "linf", eps: str | float | Iterable[str | float] = "8/255",
             attacks: str | Mapping[str, Any] | Iterable[str | Mapping[str, Any]] = DEFAULT_ATTACKS,
             protocols: str | Iterable[str] = DEFAULT_PROTOCOLS, n: int = 512, seeds: int | Iterable[int] = (0,),
             db: str | Engine | None = None, name: str | None = None, classifier: str = DEFAULT_CLASSIFIER,
             variants: str | Iterable[str] = ("clean",), variant_seed: int = 0, preset: str | None = None,
             options: Mapping[str, Any] | None = None, train_datasets: Iterable[str | None] = (None,),
             train_classifier: str | None = None, batch_size: int | str = 128, channels_last: bool = False,
             autocast: str | None = None, force: bool = False,
             allow_train: bool = True, train_seed: int = 0, data_root: str | None = None,
             artifact_root: str | None = None, progress: bool = True, executor: str = "local",
             address: str | None = None, device: str = "cpu",
             registry: Registry[DefenseEntry] | None = None) -> pd.DataFrame:
    """Evaluate a model, an entry or a registered defense name (or a list of them) on every cell of the
    grid (eps x attacks x protocols x seeds x variants), storing the cells in ``db`` (a path, a
    SQLAlchemy URL or an engine; default ``$HARNESS_DB`` or ``./results.db``). Cells already stored are
    not recomputed. Returns one row per cell (:data:`OUTCOME_COLUMNS`; accuracies in [0, 1]). A cell that
    raised has status ``failed`` and its ``error`` (the rest of the grid still runs); one another process
    computed is ``skipped`` with a ``note``. SIGINT stops at a batch boundary and raises
    :class:`~harness.evaluation.runner.Interrupted` (a ``KeyboardInterrupt``); calling again resumes.

    An ``nn.Module`` maps images in [0, 1] to logits and is evaluated as a classifier of its own, named
    ``name`` (default: its class name). ``classifier`` is the base classifier of purifier entries.
    ``executor`` is ``local`` (in process) or ``ray`` (shards on the Ray cluster at ``address``, else a
    local Ray instance); ``device`` is ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    """
    targets = _many(model_or_entry, (nn.Module, DefenseEntry, str))
    defenses = tuple(module_entry(t, name) if isinstance(t, nn.Module) else t for t in targets)
    request = RunRequest(
        defenses=defenses, dataset=dataset, classifier=classifier, threat=threat,
        eps=tuple(_eps_text(e) for e in _many(eps, (str, int, float))),
        attacks=tuple(_attack(a) for a in _many(attacks, (str, Mapping))),
        protocols=tuple(_many(protocols, (str,))), n=n, seeds=tuple(_many(seeds, (int,))),
        variants=tuple(_many(variants, (str,))), variant_seed=variant_seed, preset=preset,
        train_datasets=tuple(train_datasets), train_classifier=train_classifier, options=dict(options or {}),
        batch_size=batch_size, channels_last=channels_last, autocast=autocast, force=force,
        allow_train=allow_train, train_seed=train_seed, data_root=data_root, artifact_root=artifact_root,
        progress=progress, executor=executor, address=address, device=device)
    if not isinstance(db, Engine):
        check_request(request, registry)  # bad input creates no store
    engine = db if isinstance(db, Engine) else open_db(db)
    outcomes = run_grid(request, engine, registry)
    rows = [{"key": o.key, "defense": o.defense, "train_dataset": o.train_dataset, "variant": o.variant,
             "protocol": o.protocol, "answers": ",".join(o.requested), "attack": o.attack, "eps": o.eps,
             "seed": o.seed, "clean_acc": o.clean_acc, "robust_acc": o.robust_acc, "status": o.status,
             "error": o.error, "note": o.note}
            for o in outcomes]
    # nullable ints: an entry that failed before its cells could be planned has no seed
    return pd.DataFrame(rows, columns=list(OUTCOME_COLUMNS)).astype({"seed": "Int64"})

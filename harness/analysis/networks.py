"""What the representation analyses share: the network of an entry, obtained as ``harness run`` obtains
it, and storing analysis rows under a :class:`~harness.results.schema.Run` with the code provenance."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from torch import nn

from harness.classifiers.sources import resolve_classifier
from harness.core.artifacts import ArtifactCache
from harness.core.entry import DefenseEntry, Kind, defense_registry
from harness.core.errors import UsageError
from harness.core.registry import Registry
from harness.data import DatasetInfo
from harness.evaluation.building import build_defense, own_network
from harness.results.database import open_db
from harness.results.provenance import code_provenance
from harness.results.queries import finish_run, new_run
from harness.results.schema import Run

__all__ = ["EntryNetwork", "check_classifier_entries", "classifier_network", "stored_run"]

T = TypeVar("T")


@dataclass(frozen=True)
class EntryNetwork:
    """An entry's frozen network and the setting that names it (stored with every row)."""

    model: nn.Module
    setting: dict[str, Any]


def _analysable(registry: Registry[DefenseEntry]) -> list[str]:
    return sorted(i.value.name for i in registry.items() if i.value.kind is not Kind.PURIFIER)


def check_classifier_entries(names: Sequence[str], options: Mapping[str, Any], preset: str | None, what: str,
                             registry: Registry[DefenseEntry] | None = None) -> list[DefenseEntry]:
    """The entries ``names``, each of kind classifier or undefended (a network harness can read the
    features of); an unknown name or a purifier is a one-line :class:`UsageError` naming the valid ones.
    ``options`` must each be declared by some entry; ``preset`` is checked against the entries that have
    presets."""
    registry = registry if registry is not None else defense_registry()
    entries = []
    for name in names:
        if name not in registry:
            raise UsageError(f"unknown defense {name!r}; valid for {what}: {', '.join(_analysable(registry))}")
        entry = registry.get(name)
        if entry.kind is Kind.PURIFIER:
            raise UsageError(f"defense {name!r} is a purifier: {what} studies a network's own features; "
                             f"valid: {', '.join(_analysable(registry))}")
        entry.resolve_preset(preset)
        entries.append(entry)
    declared = {o.name for e in entries for o in e.options}
    unknown = sorted(set(options) - declared)
    if unknown:
        raise UsageError(f"no entry among {', '.join(names)} has option {unknown[0]!r}; "
                         f"valid: {', '.join(sorted(declared)) or '(none)'}")
    return entries


def classifier_network(entry: DefenseEntry, classifier: str, dataset: DatasetInfo, artifacts: ArtifactCache, *,
                       preset: str | None = None, options: Mapping[str, Any] | None = None,
                       data_root: str | None = None, progress: bool = True, train_seed: int = 0) -> EntryNetwork:
    """The network ``harness run`` evaluates for ``entry``: its own (kind classifier, trained on first use
    with ``train_seed``) or the base classifier ``classifier`` (undefended)."""
    preset = entry.resolve_preset(preset)
    opts = entry.select_options(dict(options or {}))
    if entry.uses_base_classifier:
        base = resolve_classifier(classifier, dataset, artifacts=artifacts, data_root=data_root,
                                  progress=progress)
        network_id = base.id
    else:
        base = None
        network_id = own_network(entry, preset, dataset, artifacts, options=opts, data_root=data_root,
                                 progress=progress, seed=train_seed).id
    defense = build_defense(entry, preset, base, dataset, artifacts, options=opts, data_root=data_root,
                            progress=progress, seed=train_seed)
    setting = {"defense": entry.name, "version": entry.version, "kind": entry.kind.value, "preset": preset or "",
               "options": opts, "network": network_id, "train_seed": int(train_seed)}
    return EntryNetwork(defense.classifier, setting)


def stored_run(engine: Engine | None, compute: Callable[[Session, int], T]) -> T:
    """``compute(session, run_id)`` inside a :class:`Run` of this command (its provenance), marked done
    or failed afterwards."""
    engine = engine if engine is not None else open_db()
    with Session(engine) as session:
        run_id = new_run(session, shlex.join(sys.argv), code_provenance()).id
        try:
            out = compute(session, run_id)
        except BaseException:
            session.rollback()
            finish_run(session, session.get(Run, run_id), "failed")
            raise
        finish_run(session, session.get(Run, run_id), "done")
    return out

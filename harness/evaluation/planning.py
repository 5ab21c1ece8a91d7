"""Plans, separate from execution (``harness plan``): the cells a run would compute, as plain data.

:func:`plan_request` checks a :class:`~harness.evaluation.runner.RunRequest` as ``harness run`` does,
then keys every cell of its grid with the runner's own :func:`~harness.evaluation.runner.plan_cells`, so
a planned key is exactly the key ``run`` stores. Nothing is built, loaded or trained: networks are named
by the hash of their recipe (the base classifier ``trained:<preset>``, the weights of a trained entry),
a classifier file by its digest; a network that only building could name (an entry of kind classifier
without a training recipe, a plugin classifier source) is reported as "unknown until built", and its
cells have no key. Only the data are read: the datasets' stored fingerprints, and the test split (its
variants' fingerprints are those of the transformed images).

Each :class:`CellSpec` says whether its cell is stored (read from the results store without writing
to it), which artifacts it needs (the base classifier, the entry's weights, the shared DDPM of a
diffusion purifier, a transfer attack's source network) and whether each is in the artifact cache, and
an estimated cost: network passes per sample (each forward+backward step of the attack counted once,
times the entry's declared NFE, :attr:`harness.core.entry.Metadata.nfe`, where the protocol
differentiates the defense), times ``n``. The estimate is an upper bound: attacks stop on points that
have fallen.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from sqlalchemy import create_engine, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool
from torch import nn

from harness.attacks.base import Attack, Target
from harness.attacks.transfer import SourcedAttack, SourceModel
from harness.classifiers.sources import LoadedClassifier, classifier_recipe, source_registry
from harness.core.artifacts import ArtifactCache, recipe_hash
from harness.core.entry import DefenseEntry, Kind, defense_registry
from harness.core.errors import UsageError
from harness.core.paths import data_root
from harness.core.registry import Registry
from harness.data import DatasetInfo, Split, dataset_info, load_split
from harness.data.disk import read_meta
from harness.evaluation.building import defense_recipe, own_network
from harness.evaluation.protocols import Protocol
from harness.evaluation.runner import RunRequest, TrainSource, check_request, plan_cells, variant_splits
from harness.evaluation.transfer_sources import TransferSources
from harness.results.database import resolve_url
from harness.results.schema import Cell

__all__ = ["UNKNOWN", "ArtifactNeed", "CellSpec", "Plan", "attack_passes", "classifier_network_id", "plan_request",
           "stored_status"]

#: what a plan says of a network (and the cells keyed by it) that only building could name
UNKNOWN = "unknown until built"
#: AutoAttack's documented budgets per version (Croce & Hein 2020; the autoattack library's defaults):
#: (forward+backward steps, forward-only queries) per attacked point
AUTOATTACK_PASSES = {
    "standard": (100 + 9 * 100 + 9 * 100, 5000),  # APGD-CE, APGD-T 9x100, FAB-T 9x100; Square 5000 queries
    "rand": (20 * 100 + 20 * 100, 0),  # APGD-CE and APGD-DLR, 100 steps, EOT 20
    "plus": (5 * 100 + 5 * 100 + 5 * 100 + 9 * 100 + 9 * 100, 5000),  # 5 restarts of APGD-CE/-DLR, FAB; targeted
}


@dataclass(frozen=True)
class ArtifactNeed:
    """A trained artifact a cell needs: its cache kind and recipe key, what it is, and whether it exists
    (``None``: a plan cannot tell, e.g. a RobustBench download)."""

    kind: str
    key: str
    what: str
    exists: bool | None
    path: str = ""


@dataclass(frozen=True)
class CellSpec:
    """One cell of a plan, as plain JSON-serialisable data: its key (``None`` when its network is
    unknown until built), its axes, the full key config (``config``: what the cell key hashes, enough
    for a worker to rebuild the cell through the registry and the artifact cache), whether it is stored,
    the artifacts it needs and its estimated cost."""

    key: str | None
    defense: str
    version: str
    preset: str | None
    train_dataset: str | None
    network: str
    dataset: str
    variant: str
    threat: str
    eps: str
    attack: str
    protocol: str
    requested: list[str]
    n: int
    seed: int
    status: str  # done | running | failed | missing | unknown (no key)
    artifacts: list[ArtifactNeed]
    cost: dict[str, Any]
    config: dict[str, Any] | None
    note: str = ""

    @property
    def done(self) -> bool:
        return self.status == "done"

    def describe(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict (``done`` included)."""
        return {**asdict(self), "done": self.done}


@dataclass(frozen=True)
class Plan:
    """The cells of a request (in the order ``run`` computes them) and their totals."""

    cells: list[CellSpec] = field(default_factory=list)
    #: why part of the grid could not be planned (e.g. a dataset that is not here), one line each
    problems: list[str] = field(default_factory=list)

    def __add__(self, other: "Plan") -> "Plan":
        """Two plans as one, each cell once (the first occurrence of a key)."""
        seen = {c.key for c in self.cells if c.key is not None}
        return Plan(self.cells + [c for c in other.cells if c.key is None or c.key not in seen],
                    self.problems + other.problems)

    def artifacts(self) -> list[ArtifactNeed]:
        """Every artifact the cells need, once each, in first-need order."""
        found: dict[tuple[str, str], ArtifactNeed] = {}
        for cell in self.cells:
            for need in cell.artifacts:
                found.setdefault((need.kind, need.key), need)
        return list(found.values())

    def totals(self) -> dict[str, Any]:
        """How many cells, how many stored, and the network passes of the cells still to compute."""
        todo = [c for c in self.cells if not c.done]
        passes = [c.cost.get("network_passes") for c in todo]
        return {"cells": len(self.cells), "done": len(self.cells) - len(todo), "to_compute": len(todo),
                "unknown_keys": sum(1 for c in self.cells if c.key is None),
                "network_passes_to_compute": sum(p for p in passes if p is not None),
                "cells_without_estimate": sum(1 for p in passes if p is None),
                "artifacts_missing": sum(1 for a in self.artifacts() if a.exists is False)}

    def describe(self) -> dict[str, Any]:
        """The plan as a JSON-ready dict: ``cells``, ``artifacts`` and ``totals``."""
        return {"cells": [c.describe() for c in self.cells], "artifacts": [asdict(a) for a in self.artifacts()],
                "totals": self.totals(), "problems": list(self.problems)}


class _Unloaded(nn.Module):
    """Stands in for a network a plan names but never loads."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args: Any) -> torch.Tensor:
        raise RuntimeError(f"{self.name} is not loaded: a plan names networks, it never runs them")


def _stand_in(network_id: str, spec: str) -> LoadedClassifier:
    """A classifier named ``network_id`` that is not loaded (its ``model`` refuses to run)."""
    return LoadedClassifier(_Unloaded(spec), network_id, {"source": "plan", "spec": spec})


def _train_fingerprint(name: str, root: str | None) -> str:
    """The fingerprint of ``name``'s training split, from its stored meta (imported from a mirror first
    if it is not stored yet: data, not models)."""
    meta = read_meta(data_root(root), name)
    if meta is None:
        return load_split(name, "train", root).fingerprint
    return str(meta["splits"]["train"]["fingerprint"])


def _source(spec: str) -> tuple[str, str]:
    """``(source, rest)`` of a classifier spec, parsed as :func:`resolve_classifier` does."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in source_registry().names():
        return kind, rest
    return "file", spec


@dataclass(frozen=True)
class _Named:
    """A base classifier named without loading it: a stand-in :class:`LoadedClassifier` (``None`` when
    only loading could name it) and the artifact it needs."""

    classifier: LoadedClassifier | None
    need: ArtifactNeed | None


class _Namer:
    """Names the networks of one plan (each once): base classifiers by spec and dataset."""

    def __init__(self, request: RunRequest, artifacts: ArtifactCache):
        self.request, self.artifacts = request, artifacts
        self._named: dict[tuple[str, str], _Named] = {}

    def base(self, spec: str, info: DatasetInfo) -> _Named:
        if (spec, info.name) not in self._named:
            self._named[spec, info.name] = self._name(spec, info)
        return self._named[spec, info.name]

    def _name(self, spec: str, info: DatasetInfo) -> _Named:
        kind, rest = _source(spec)
        if kind == "trained":
            recipe = classifier_recipe(rest, info, _train_fingerprint(info.name, self.request.data_root),
                                       self.request.train_seed)
            key = recipe_hash(recipe)
            found = self.artifacts.find("classifier", recipe)
            need = ArtifactNeed("classifier", key, f"base classifier {spec} on {info.name}", found is not None,
                                str(self.artifacts.path_for("classifier", recipe)))
            return _Named(_stand_in(f"trained:{rest}@{key}", spec), need)
        if kind == "file":
            path = Path(rest).expanduser()
            if not path.is_file():
                raise UsageError(f"classifier file {path} does not exist")
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            need = ArtifactNeed("classifier-file", digest, f"base classifier file {path.name}", True, str(path))
            return _Named(_stand_in(f"file:{path.name}@{digest}", spec), need)
        if kind == "robustbench":
            need = ArtifactNeed("robustbench", rest, f"RobustBench model {rest} (downloaded on first use)", None,
                                str(self.artifacts.root / "robustbench"))
            return _Named(_stand_in(f"robustbench:{rest}", spec), need)
        return _Named(None, ArtifactNeed(f"classifier-source/{kind}", rest, f"base classifier {spec} ({UNKNOWN})",
                                         None))



def _weights_needs(entry: DefenseEntry, preset: str | None, base: LoadedClassifier | None, dataset: DatasetInfo,
                   request: RunRequest, artifacts: ArtifactCache) -> list[ArtifactNeed]:
    """The entry's trained weights on ``dataset`` (and the shared DDPM they are made from, for a
    diffusion purifier), if it has a training recipe."""
    if entry.train is None:
        return []
    fingerprint = _train_fingerprint(dataset.name, request.data_root)
    recipe = defense_recipe(entry, preset, base if entry.uses_base_classifier else None, dataset.name,
                            fingerprint, request.train_seed)
    kind = f"defense/{entry.name}"
    found = artifacts.find(kind, recipe)
    needs = [ArtifactNeed(kind, recipe_hash(recipe), f"{entry.name} weights ({preset}) on {dataset.name}",
                          found is not None, str(artifacts.path_for(kind, recipe)))]
    ddpm = recipe["config"].get("ddpm")
    if isinstance(ddpm, str) and found is None and not entry.select_options(request.options).get("unet"):
        from harness.toolkit.diffusion import ddpm_recipe

        # the recipe reads the split's identity only (name, split, fingerprint): no images are loaded
        split = Split(dataset, "train", torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64),
                      fingerprint, "")
        shared = ddpm_recipe(ddpm, split, request.train_seed)
        needs.append(ArtifactNeed("ddpm", recipe_hash(shared), f"shared DDPM {ddpm!r} on {dataset.name}",
                                  artifacts.find("ddpm", shared) is not None, str(artifacts.path_for("ddpm", shared))))
    return needs


def attack_passes(params: Mapping[str, Any]) -> tuple[int, int] | None:
    """(forward+backward steps, forward-only queries) an attack spends per attacked point, from its
    params (:meth:`Attack.params`); ``None`` for an attack whose budget a plan does not know."""
    name = params.get("name")
    if name == "pgd":
        return int(params["steps"]) * int(params.get("restarts", 1)) * int(params.get("eot", 1)), 0
    if name == "transfer":
        return int(params["steps"]) * int(params.get("restarts", 1)), 1
    if name in ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t"):
        return int(params.get("targets", params.get("restarts", 1))) * int(params["iterations"]), 0
    if name == "square":
        return 0, int(params["queries"])
    if name == "autoattack":
        return AUTOATTACK_PASSES.get(str(params.get("version")))
    return None


def _cost(entry: DefenseEntry, protocol: Protocol, attack: Attack, n: int) -> dict[str, Any]:
    """The estimated network passes of one cell (see the module docstring)."""
    nfe = entry.metadata.nfe or 1
    params = attack.params()
    passes = attack_passes(params)
    # the attack differentiates the whole defense unless the protocol attacks the bare classifier (and a
    # transfer attack crafts on its source, a classifier)
    through = 1 if protocol.name == "non-adaptive" or isinstance(attack, SourcedAttack) else nfe
    draws = 1 + int(getattr(protocol, "worst_of", 1))  # the clean pass, and the adversarial evaluation(s)
    out: dict[str, Any] = {"nfe": nfe, "attack_through_nfe": through, "evaluation_passes": draws * nfe,
                           "forward_backward_per_sample": None, "forward_per_sample": None,
                           "network_passes": None}
    if passes is not None:
        fb, fwd = passes
        per_sample = (fb + fwd) * through + draws * nfe
        out.update(forward_backward_per_sample=fb, forward_per_sample=fwd, network_passes=per_sample * n)
    return out


class _PlanSources:
    """Transfer-attack sources for a plan: named as the runner names them (:class:`TransferSources`,
    whose models are built only when a cell runs, so never here); a classifier entry without a training
    recipe can only be named by building it, so its attacks get an unknown source."""

    def __init__(self, sources: TransferSources, registry: Registry[DefenseEntry]):
        self.sources, self.registry = sources, registry

    def bind(self, attack: Attack) -> Attack:
        """``attack`` bound to its named (never built) source, if it needs one."""
        if not isinstance(attack, SourcedAttack):
            return attack
        entry = self.registry.get(attack.source)
        if entry.kind is Kind.CLASSIFIER and entry.train is None:
            return attack.with_source(SourceModel({"entry": entry.name, "network": UNKNOWN}, _never))
        return self.sources.bind(attack)


def _never(seed: int) -> Target:
    raise RuntimeError("a plan never runs a transfer source")


def classifier_network_id(spec: str, info: DatasetInfo, *, data_root: str | None = None,
                          artifact_root: str | None = None, seed: int = 0) -> str | None:
    """The id the base classifier ``spec`` has in cell keys on dataset ``info``, named without loading it
    (``None``: only loading it could name it)."""
    request = RunRequest(defenses=(), data_root=data_root, artifact_root=artifact_root, train_seed=seed)
    named = _Namer(request, ArtifactCache(artifact_root, allow_train=False)).base(spec, info)
    return named.classifier.id if named.classifier is not None else None


def stored_status(db: str | Engine | None, keys: list[str]) -> dict[str, str]:
    """Cell key -> stored status (``done``, ``running``, ``failed``) of the ``keys`` found in the store
    ``db`` (an engine, a path or URL; default ``$HARNESS_DB`` or ``./results.db``). Read only: a store
    that does not exist yet is not created, and an old store is not upgraded."""
    if not keys:
        return {}
    if isinstance(db, Engine):
        engine, own = db, False
    else:
        url = resolve_url(db)
        if url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite:///"):]):
            return {}
        engine, own = create_engine(url, poolclass=NullPool), True
    try:
        if not inspect(engine).has_table(Cell.__tablename__):
            return {}
        found: dict[str, str] = {}
        with engine.connect() as connection:
            for lo in range(0, len(keys), 500):
                rows = connection.execute(select(Cell.key, Cell.status).where(Cell.key.in_(keys[lo:lo + 500])))
                found.update({key: status for key, status in rows})
        return found
    finally:
        if own:
            engine.dispose()


def plan_request(request: RunRequest, registry: Registry[DefenseEntry] | None = None, *,
                 db: str | Engine | None = None) -> Plan:
    """The cells ``harness run`` would evaluate for ``request`` (checked as ``run`` checks it: a one-line
    :class:`UsageError` on bad input), each with its stored status in ``db``, its artifacts and its cost.
    Builds, loads and trains nothing."""
    registry = registry or defense_registry()
    entries, protocols, threats = check_request(request, registry, classifiers=False)
    artifacts = ArtifactCache(request.artifact_root, allow_train=False)
    test = load_split(request.dataset, "test", request.data_root)
    splits = variant_splits(request, test)
    namer = _Namer(request, artifacts)
    def base_or_unknown() -> LoadedClassifier:
        return namer.base(request.classifier, test.info).classifier or _stand_in(UNKNOWN, request.classifier)

    transfer = _PlanSources(TransferSources(registry, test.info, artifacts, base_or_unknown, preset=request.preset,
                                            options=request.options, data_root=request.data_root,
                                            progress=False, seed=request.train_seed), registry)
    specs: list[CellSpec] = []
    for entry in entries:
        specs += _entry_cells(request, entry, protocols, threats, test, splits, namer, transfer, artifacts)
    status = stored_status(db, [s.key for s in specs if s.key is not None])
    return Plan([_with_status(s, status) for s in specs])


def _with_status(spec: CellSpec, status: Mapping[str, str]) -> CellSpec:
    if spec.key is None:
        return spec
    return replace(spec, status=status.get(spec.key, "missing"))


def _entry_cells(request: RunRequest, entry: DefenseEntry, protocols: list[Protocol], threats: list,
                 test: Split, splits: dict[str, Split], namer: _Namer, transfer: _PlanSources,
                 artifacts: ArtifactCache) -> list[CellSpec]:
    """The specs of ``entry``'s cells (status ``unknown`` until :func:`stored_status` fills it in)."""
    preset = entry.resolve_preset(request.preset)
    needs: list[ArtifactNeed] = []
    base: LoadedClassifier | None = None
    if entry.uses_base_classifier:
        named = namer.base(request.classifier, test.info)
        base = named.classifier
        needs += [named.need] if named.need else []
        network = base.id if base is not None else UNKNOWN
    elif entry.train is not None:
        network = own_network(entry, preset, test.info, artifacts, options=entry.select_options(request.options),
                              data_root=request.data_root, progress=False, seed=request.train_seed).id
    else:
        network = UNKNOWN
    sources: dict[str | None, TrainSource | None] = {}
    weights: dict[str | None, list[ArtifactNeed]] = {}
    for name in dict.fromkeys(request.train_datasets):
        if name in (None, request.dataset) or entry.kind is not Kind.PURIFIER:
            sources[None] = None
            weights[None] = _weights_needs(entry, preset, base, test.info, request, artifacts) if (
                base is not None or not entry.uses_base_classifier) else []
            continue
        info = dataset_info(name)
        trained_on = namer.base(request.train_classifier or request.classifier, info)
        stand_in = trained_on.classifier or _stand_in(UNKNOWN, request.train_classifier or request.classifier)
        sources[name] = TrainSource(info, _train_fingerprint(name, request.data_root), stand_in)
        weights[name] = ([trained_on.need] if trained_on.need else []) + (
            _weights_needs(entry, preset, stand_in, info, request, artifacts) if trained_on.classifier else [])
    planned = plan_cells(request, entry, protocols, threats, network, splits, sources, transfer.bind)
    specs = []
    for item in planned:
        attack = item.attack_instance()
        networks = [network, item.source.classifier.id if item.source else ""]
        cell_needs = needs + weights[item.source.info.name if item.source else None]
        if isinstance(attack, SourcedAttack):
            networks.append(attack.params()["source"]["network"])
            cell_needs = cell_needs + _source_needs(attack, request, namer, test.info, artifacts, transfer.registry)
        cell_needs = list({(a.kind, a.key): a for a in cell_needs}.values())
        known = UNKNOWN not in networks
        specs.append(CellSpec(
            key=item.key if known else None, defense=entry.name, version=entry.version, preset=preset,
            train_dataset=item.source.info.name if item.source else None, network=network,
            dataset=test.info.name, variant=item.key_config["dataset"]["variant"], threat=item.threat.norm,
            eps=item.threat.eps.text, attack=attack.label(), protocol=item.protocol.name,
            requested=list(item.requested), n=request.n, seed=item.seed, status="missing" if known else "unknown",
            artifacts=cell_needs, cost=_cost(entry, item.protocol, attack, request.n),
            config=item.key_config if known else None, note="" if known else f"a network is {UNKNOWN}: no key"))
    return specs


def _source_needs(attack: SourcedAttack, request: RunRequest, namer: _Namer, info: DatasetInfo,
                  artifacts: ArtifactCache, registry: Registry[DefenseEntry]) -> list[ArtifactNeed]:
    """What a transfer attack's source network needs: the base classifier, or the source entry's weights."""
    entry = registry.get(attack.source)
    if entry.uses_base_classifier:
        named = namer.base(request.classifier, info)
        return [named.need] if named.need else []
    return _weights_needs(entry, entry.resolve_preset(request.preset), None, info, request, artifacts)

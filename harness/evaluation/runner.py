"""Plan cells -> skip finished ones -> execute the rest batch by batch -> persist.

A cell is (defense@version+preset+options [+ the dataset its purifier was trained on, when that is
another one], classifier network, dataset@fingerprint, variant, threat, eps, attack@params, protocol, n,
seed); its key is a hash of exactly that. The network is the run's base classifier for purifiers and the
undefended entry, and the entry's own network for an entry of kind classifier (no base classifier is
loaded for it). Per-sample results are committed one batch at a time, so an interrupted run resumes
inside the cell it was in.
"""

from __future__ import annotations

import itertools
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from tqdm import tqdm

from harness.attacks.base import Attack, perturbation_norm
from harness.attacks.catalog import build_attack
from harness.classifiers.sources import DEFAULT_CLASSIFIER, LoadedClassifier, resolve_classifier
from harness.core.artifacts import ArtifactCache
from harness.core.entry import Defense, DefenseEntry, Kind, defense_registry
from harness.core.errors import UsageError
from harness.core.keys import CELL_KEY_LENGTH, content_hash
from harness.core.noise import FixedNoise
from harness.core.registry import Registry, suggest
from harness.core.threat import Epsilon, ThreatModel
from harness.data import DatasetInfo, Split, dataset_info, load_split
from harness.data.variants import apply_variant, parse_variant
from harness.evaluation.building import (OwnNetwork, build_defense, build_transferred_defense, check_transferable,
                                         own_network)
from harness.evaluation.metrics import batch_quality, merge_quality
from harness.evaluation.protocols import Protocol, get_protocol, protocol_for
from harness.results.provenance import code_provenance
from harness.results.queries import (add_samples, done_indices, find_cell, finish_cell, finish_run, new_run,
                                     reset_cell)
from harness.results.schema import Cell, Run

__all__ = ["DEFAULT_ATTACK", "DEFAULT_PROTOCOLS", "RunRequest", "CellOutcome", "evaluation_subset", "run_grid"]

log = logging.getLogger(__name__)
DEFAULT_ATTACK = {"name": "pgd", "steps": 20}
DEFAULT_PROTOCOLS = ("non-adaptive", "adaptive")
SUBSET_SEED = 0
SUBSET_RULE = f"first n of a fixed permutation (seed {SUBSET_SEED})"


def evaluation_subset(total: int, n: int) -> torch.Tensor:
    """The dataset indices a cell evaluates: the first ``n`` of one fixed permutation of the split.

    A permutation rather than the first ``n`` images, because an ImageFolder import is ordered class
    by class; it is fixed (not the run seed), so every cell of every run sees the same images, and a
    larger ``n`` extends a smaller one.
    """
    order = torch.randperm(total, generator=torch.Generator().manual_seed(SUBSET_SEED))
    return order[:n]


@dataclass(frozen=True)
class RunRequest:
    """Everything ``harness run`` (or :func:`harness.api.evaluate`) was asked for; several values on an
    axis make a grid. ``defenses`` are registered names or :class:`DefenseEntry` objects."""

    defenses: tuple[str | DefenseEntry, ...]
    dataset: str = "cifar10"
    classifier: str = DEFAULT_CLASSIFIER
    threat: str = "linf"
    eps: tuple[str, ...] = ("8/255",)
    attacks: tuple[Mapping[str, Any], ...] = (DEFAULT_ATTACK,)
    protocols: tuple[str, ...] = DEFAULT_PROTOCOLS
    n: int = 512
    seeds: tuple[int, ...] = (0,)
    variants: tuple[str, ...] = ("clean",)
    variant_seed: int = 0
    preset: str | None = None
    #: datasets the purifiers are trained on; ``None`` means the evaluation dataset (no transfer)
    train_datasets: tuple[str | None, ...] = (None,)
    #: classifier spec the purifiers of another dataset are trained against (default: ``classifier``)
    train_classifier: str | None = None
    #: ``--option`` values; each entry receives the ones it declares
    options: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 128
    force: bool = False
    allow_train: bool = True
    train_seed: int = 0
    data_root: str | None = None
    artifact_root: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class CellOutcome:
    key: str
    defense: str
    variant: str
    protocol: str
    attack: str
    eps: str
    seed: int
    status: str  # "done" (computed now) | "skipped" (already stored)
    clean_acc: float
    robust_acc: float
    train_dataset: str | None = None  # set when the purifier was trained on another dataset
    #: the requested protocols this cell answers (several for an entry without a purifier)
    requested: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainSource:
    """Where a transferred purifier was trained: another dataset and the classifier of that dataset."""

    info: DatasetInfo
    fingerprint: str  # of its training split
    classifier: LoadedClassifier

    def describe(self) -> dict[str, Any]:
        return {"train_dataset": self.info.name, "train_fingerprint": self.fingerprint,
                "train_classifier": self.classifier.id}


@dataclass(frozen=True)
class _PlannedCell:
    entry: DefenseEntry
    preset: str | None
    options: Mapping[str, Any]  # the entry's own (declared, validated) options
    source: TrainSource | None  # None: trained on the evaluation dataset
    protocol: Protocol
    requested: tuple[str, ...]  # the protocols asked for that this cell answers
    threat: ThreatModel
    attack: Mapping[str, Any]
    seed: int
    split: Split  # the (variant of the) test split the cell evaluates
    key_config: dict[str, Any]

    def attack_instance(self) -> Attack:
        """The attack the cell runs (the protocol drops EOT draws that would repeat fixed noise)."""
        return self.protocol.attack_for(build_attack(self.attack, self.threat))

    @property
    def key(self) -> str:
        return content_hash(self.key_config, CELL_KEY_LENGTH)


@dataclass(frozen=True)
class _Network:
    """The classifier network a cell evaluates: its id (in the key) and its provenance."""

    id: str
    provenance: dict[str, Any]


def _entries(request: RunRequest, registry: Registry[DefenseEntry]) -> list[DefenseEntry]:
    if not request.defenses:
        raise UsageError(f"no defense given; valid: {', '.join(registry.names())}")
    return [d if isinstance(d, DefenseEntry) else registry.get(d) for d in request.defenses]


def _check_options(request: RunRequest, entries: list[DefenseEntry]) -> None:
    """Every ``--option`` must be declared by an entry of the grid, with a valid value for each."""
    declared = sorted({o.name for e in entries for o in e.options})
    for key in request.options:
        if key not in declared:
            owners = "; ".join(f"{e.name}: {', '.join(o.name for o in e.options) or '(none)'}" for e in entries)
            raise UsageError(f"no defense of this run has an option {key!r}{suggest(key, declared)}; "
                             f"valid options: {owners}")
    for entry in entries:
        entry.select_options(request.options)


def _validate(request: RunRequest, entries: list[DefenseEntry]) -> tuple[list[Protocol], list[ThreatModel]]:
    """Check every axis before anything runs, so bad input costs nothing and stores nothing."""
    dataset_info(request.dataset)
    transfers = [d for d in request.train_datasets if d not in (None, request.dataset)]
    for name in transfers:
        dataset_info(name)
    protocols = [get_protocol(name) for name in request.protocols]
    threats = [ThreatModel(request.threat, Epsilon.parse(e)) for e in request.eps]
    for variant in request.variants:
        parse_variant(variant)
    for threat, spec in itertools.product(threats, request.attacks):
        build_attack(spec, threat)
    _check_options(request, entries)
    for entry in entries:
        entry.check_dataset(request.dataset)
        entry.resolve_preset(request.preset)
        for name in transfers:
            check_transferable(entry, name)
        for protocol in protocols:
            protocol_for(protocol, entry).check(entry)
    if request.n < 1:
        raise UsageError("--n must be at least 1")
    return protocols, threats


def _plan(request: RunRequest, entry: DefenseEntry, protocols: list[Protocol], threats: list[ThreatModel],
          network_id: str, splits: dict[str, Split], sources: dict[str | None, TrainSource | None]
          ) -> list[_PlannedCell]:
    preset = entry.resolve_preset(request.preset)
    options = entry.select_options(request.options)
    cells: dict[str, _PlannedCell] = {}
    for source, (variant, test), threat, spec, asked, seed in itertools.product(
            sources.values(), splits.items(), threats, request.attacks, protocols, request.seeds):
        protocol = protocol_for(asked, entry)
        attack = protocol.attack_for(build_attack(spec, threat))
        dataset = {"name": test.info.name, "split": test.split, "fingerprint": test.fingerprint,
                   "variant": variant, "subset": SUBSET_RULE}
        if variant == "colored":
            dataset["variant_seed"] = request.variant_seed
        key_config = {
            "defense": {"name": entry.name, "version": entry.version, "preset": preset,
                        "preset_config": entry.preset_config(preset), "options": options,
                        "train_seed": request.train_seed, **(source.describe() if source else {})},
            "classifier": network_id,
            "dataset": dataset,
            "threat": threat.describe(), "attack": attack.params(), "protocol": protocol.name,
            "n": min(request.n, len(test.labels)), "seed": seed,
        }
        cell = _PlannedCell(entry, preset, options, source, protocol, (asked.name,), threat, spec, seed, test,
                            key_config)
        # one cell answers every request with its key: e.g. pgd and pgd:eot=4 under fixed randomness, or
        # non-adaptive and adaptive for an entry without a purifier
        same = cells.get(cell.key)
        if same is None:
            cells[cell.key] = cell
        elif asked.name not in same.requested:
            cells[cell.key] = replace(same, requested=same.requested + (asked.name,))
    return list(cells.values())


def _entry_metadata(entry: DefenseEntry, registry: Registry[DefenseEntry]) -> dict[str, Any]:
    meta = entry.describe()
    if entry.name in registry.names() and registry.get(entry.name) is entry:
        info = registry.info(entry.name)
        meta["distribution"] = {"name": info.distribution, "version": info.distribution_version,
                                "source": info.source}
    else:
        meta["distribution"] = {"name": "", "version": "", "source": "ad hoc (Python API)"}
    return meta


def _parameters(module: torch.nn.Module) -> int:
    """Every parameter of ``module`` (the frozen ones included)."""
    return sum(p.numel() for p in module.parameters())


def _protocol_note(planned: _PlannedCell) -> str:
    others = [p for p in planned.requested if p != planned.protocol.name]
    if not others:
        return ""
    return (f"{planned.entry.name} has no purifier: {', '.join(others)} attack the same function as "
            f"{planned.protocol.name}, so this one cell answers them all")


def _open_cell(session: Session, planned: _PlannedCell, run: Run, network: _Network, defense: Defense,
               metadata: dict[str, Any], force: bool) -> Cell:
    cell = find_cell(session, planned.key)
    if cell is not None:
        if force:
            reset_cell(session, cell)
        cell.run_id = run.id
        return cell
    attack = planned.attack_instance()
    test = planned.split
    part = defense.purifier if defense.has_purifier else defense.classifier
    metadata = dict(metadata, parameters={"classifier": _parameters(defense.classifier),
                                          "purifier": _parameters(defense.purifier)})
    config = dict(planned.key_config, entry=metadata, protocol_tier=planned.protocol.tier,
                  classifier_provenance=network.provenance, data_source=test.source,
                  defense_provenance=getattr(part, "provenance", None))
    note = _protocol_note(planned)
    if note:
        config["protocol_note"] = note
    cell = Cell(key=planned.key, run_id=run.id, defense=planned.entry.name,
                defense_version=planned.entry.version, preset=planned.preset or "",
                classifier=network.id, dataset=test.info.name, dataset_fingerprint=test.fingerprint,
                data_source=test.source, variant=planned.key_config["dataset"]["variant"], threat=planned.threat.norm,
                eps=planned.threat.eps.value, eps_text=planned.threat.eps.text, attack=attack.name,
                attack_label=attack.label(), protocol=planned.protocol.name,
                n=planned.key_config["n"], seed=planned.seed, config=config)
    session.add(cell)
    session.flush()
    return cell


def _check_batch(x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel, norms: torch.Tensor) -> None:
    """Every adversarial image must lie within eps of its clean image and inside [0, 1]."""
    if x_adv.min() < 0 or x_adv.max() > 1 or bool((norms > threat.eps.value * (1 + 1e-5) + 1e-6).any()):
        raise RuntimeError(f"attack left the threat model ({threat.norm} eps {threat.eps}): "
                           f"max norm {norms.max():.6f}, range [{x_adv.min():.4f}, {x_adv.max():.4f}]")


def _execute(session: Session, cell: Cell, planned: _PlannedCell, defense: Defense,
             request: RunRequest) -> None:
    attack = planned.attack_instance()
    test = planned.split
    measure_quality = planned.entry.kind is Kind.PURIFIER
    done = done_indices(session, cell)
    todo = [i for i in evaluation_subset(len(test.labels), cell.n).tolist() if i not in done]
    batches = [todo[i:i + request.batch_size] for i in range(0, len(todo), request.batch_size)]
    label = f"{cell.defense} {cell.protocol} {cell.attack_label} eps={cell.eps_text} seed={cell.seed}"
    for batch in tqdm(batches, desc=label, disable=not request.progress, unit="batch"):
        started = time.time()
        indices = torch.tensor(batch)
        x, y = test.float_images(indices), test.labels[indices]
        result = planned.protocol.run(planned.entry, defense, attack, x, y, indices, planned.seed)
        norms = perturbation_norm(result.x_adv, x, planned.threat.norm)
        _check_batch(result.x_adv, x, planned.threat, norms)
        if measure_quality:
            cell.metrics = merge_quality(cell.metrics, batch_quality(
                defense, x, result.x_adv, FixedNoise(planned.seed, namespace="defense"), indices))
        extras = result.extra or [None] * len(batch)
        add_samples(session, cell, ({"index": int(i), "label": int(lab), "clean_pred": int(c),
                                     "adv_pred": int(a), "perturbation": float(p), "extra": e}
                                    for i, lab, c, a, p, e in zip(batch, y, result.clean_pred,
                                                                   result.adv_pred, norms, extras)))
        cell.n_done += len(batch)
        cell.seconds += time.time() - started
        session.commit()
    finish_cell(session, cell)


class _Classifiers:
    """Base classifiers by (spec, dataset), resolved (and trained) only when an entry needs one."""

    def __init__(self, request: RunRequest, artifacts: ArtifactCache):
        self._request, self._artifacts = request, artifacts
        self._loaded: dict[tuple[str, str], LoadedClassifier] = {}

    def get(self, spec: str, info: DatasetInfo) -> LoadedClassifier:
        if (spec, info.name) not in self._loaded:
            r = self._request
            self._loaded[spec, info.name] = resolve_classifier(
                spec, info, artifacts=self._artifacts, data_root=r.data_root, threat=r.threat,
                progress=r.progress, seed=r.train_seed)
        return self._loaded[spec, info.name]


@dataclass
class _Grid:
    """What every entry of one run shares."""

    request: RunRequest
    registry: Registry[DefenseEntry]
    protocols: list[Protocol]
    threats: list[ThreatModel]
    test: Split
    splits: dict[str, Split]
    artifacts: ArtifactCache
    classifiers: _Classifiers

    def sources(self, entry: DefenseEntry) -> dict[str | None, TrainSource | None]:
        """The datasets ``entry`` is trained on: its own (``None``), and others for transferred purifiers."""
        r = self.request
        out: dict[str | None, TrainSource | None] = {}
        for name in dict.fromkeys(r.train_datasets):
            if name in (None, r.dataset):
                out[None] = None
                continue
            info = dataset_info(name)
            classifier = self.classifiers.get(r.train_classifier or r.classifier, info)
            out[name] = TrainSource(info, load_split(name, "train", r.data_root).fingerprint, classifier)
        return out


def run_grid(request: RunRequest, engine: Engine, registry: Registry[DefenseEntry] | None = None
             ) -> list[CellOutcome]:
    """Evaluate every cell of ``request`` that is not stored yet; return one outcome per cell."""
    registry = registry or defense_registry()
    entries = _entries(request, registry)
    protocols, threats = _validate(request, entries)
    test = load_split(request.dataset, "test", request.data_root)
    artifacts = ArtifactCache(request.artifact_root, allow_train=request.allow_train)
    splits = {variant: apply_variant(test, variant, request.variant_seed) for variant in request.variants}
    grid = _Grid(request, registry, protocols, threats, test, splits, artifacts, _Classifiers(request, artifacts))
    outcomes: list[CellOutcome] = []
    with Session(engine, expire_on_commit=False) as session:
        run = new_run(session, shlex.join(sys.argv), code_provenance())
        try:
            for entry in entries:
                outcomes += _run_entry(session, run, grid, entry)
        except BaseException:
            session.rollback()
            finish_run(session, run, "interrupted")
            raise
        finish_run(session, run, "done")
    return outcomes


def _build(grid: _Grid, item: _PlannedCell, classifier: LoadedClassifier | None) -> Defense:
    r = grid.request
    kwargs = dict(options=item.options, data_root=r.data_root, progress=r.progress, seed=r.train_seed)
    if item.source is None:
        return build_defense(item.entry, item.preset, classifier, item.split.info, grid.artifacts, **kwargs)
    return build_transferred_defense(item.entry, item.preset, item.source.classifier, item.source.info,
                                     classifier, item.split.info, grid.artifacts, **kwargs)


def _run_entry(session: Session, run: Run, grid: _Grid, entry: DefenseEntry) -> list[CellOutcome]:
    r = grid.request
    own: OwnNetwork | None = None
    classifier: LoadedClassifier | None = None
    if entry.uses_base_classifier:
        classifier = grid.classifiers.get(r.classifier, grid.test.info)
        network = _Network(classifier.id, classifier.provenance)
    else:
        own = own_network(entry, entry.resolve_preset(r.preset), grid.test.info, grid.artifacts,
                          options=entry.select_options(r.options), data_root=r.data_root, progress=r.progress,
                          seed=r.train_seed)
        network = _Network(own.id, own.provenance)
    sources = grid.sources(entry) if entry.kind is Kind.PURIFIER else {None: None}
    planned = _plan(r, entry, grid.protocols, grid.threats, network.id, grid.splits, sources)
    metadata = _entry_metadata(entry, grid.registry)
    defenses: dict[str | None, Defense] = {None: own.defense} if own and own.defense else {}
    outcomes = []
    for item in planned:
        cell = find_cell(session, item.key)
        status = "skipped"
        if cell is None or cell.status != "done" or r.force:
            source = item.source.info.name if item.source else None
            if source not in defenses:
                defenses[source] = _build(grid, item, classifier)
            defense = defenses[source]
            cell = _open_cell(session, item, run, network, defense, metadata, r.force)
            session.commit()
            _execute(session, cell, item, defense, r)
            status = "done"
        else:
            log.info("skipping finished cell %s (%s %s)", item.key, entry.name, item.protocol.name)
        outcomes.append(CellOutcome(cell.key, entry.name, cell.variant, cell.protocol, cell.attack_label,
                                    cell.eps_text, cell.seed, status, cell.clean_acc, cell.robust_acc,
                                    item.source.info.name if item.source else None, item.requested))
    return outcomes

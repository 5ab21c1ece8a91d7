"""Plan cells -> skip finished ones -> execute the rest batch by batch -> persist.

A cell is (defense@version+preset+options [+ the dataset its purifier was trained on, when that is
another one], classifier network, dataset@fingerprint, variant, threat, eps, attack@params, protocol, n,
seed); its key is a hash of exactly that. The network is the run's base classifier for purifiers and the
undefended entry, and the entry's own network for an entry of kind classifier (no base classifier is
loaded for it). Per-sample results are committed one batch at a time, so an interrupted run resumes
inside the cell it was in.

A cell that raises (in its defense's build or forward, with non-finite or wrongly shaped logits, or an
attack leaving the threat model) is stored as ``failed`` with its error, and the grid goes on. SIGINT and
SIGTERM stop the run after the batch in flight is committed (:class:`Interrupted`). Before computing a
cell, a process claims it in the ``claims`` table and keeps the claim alive by heartbeats; a claim whose
heartbeat is older than ``$HARNESS_CLAIM_TIMEOUT`` seconds (default 120) belongs to a dead process and
is taken over. Cells claimed by a live process are waited for at the end of the grid.
"""

from __future__ import annotations

import functools
import itertools
import logging
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from tqdm import tqdm

from harness.attacks.base import Attack
from harness.attacks.catalog import attack_registry, build_attack
from harness.classifiers.sources import DEFAULT_CLASSIFIER, LoadedClassifier, check_classifier, resolve_classifier
from harness.attacks.transfer import SourcedAttack
from harness.core.artifacts import ArtifactCache
from harness.core.devices import resolve_device
from harness.core.entry import Defense, DefenseEntry, Kind, defense_registry
from harness.core.errors import UsageError
from harness.core.keys import CELL_KEY_LENGTH, content_hash
from harness.core.paths import artifact_root, data_root
from harness.core.registry import Registry, suggest
from harness.core.threat import Epsilon, ThreatModel
from harness.data import DatasetInfo, Split, dataset_info, dataset_names, load_split
from harness.data.disk import read_meta
from harness.data.variants import apply_variant, parse_variant, variant_registry
from harness.evaluation.batching import AUTO, resolve_batch_size
from harness.evaluation.building import (OwnNetwork, build_defense, build_transferred_defense, check_transferable,
                                         own_network, training_record, weights_fingerprint)
from harness.evaluation.concurrency import CLAIM_TIMEOUT_ENV, ClaimLost, Claims, Signals, claim_timeout
from harness.evaluation.executors import CellJob, Executor, check_executor, make_executor
from harness.evaluation.executors.batches import BatchResult, CellWork
from harness.evaluation.metrics import merge_quality
from harness.evaluation.precision import Precision
from harness.evaluation.protocols import Protocol, get_protocol, protocol_for, protocol_registry
from harness.evaluation.sharing import shared_defense
from harness.evaluation.transfer_sources import TransferSources, attack_note, check_sources, source_names
from harness.results.provenance import code_provenance
from harness.results.queries import (add_samples, done_indices, fail_cell, find_cell, finish_cell, finish_run,
                                     new_run, reset_cell, retry_locked)
from harness.results.schema import Cell, Run

__all__ = ["DEFAULT_ATTACKS", "DEFAULT_PROTOCOLS", "CLAIM_TIMEOUT_ENV", "KEY_FIELDS", "OPTIONAL_KEY_FIELDS",
           "RunRequest", "CellOutcome", "Interrupted", "cell_key",
           "check_request", "plan_cells", "variant_splits",
           "evaluation_subset", "run_grid", "rebuild_cell_work"]

log = logging.getLogger(__name__)
#: PGD-20 and AutoAttack standard: on the trained small classifiers PGD-20 alone was 4.9 points weaker than
#: AutoAttack at 2/255 on CIFAR-10 and 12.1 at 8/255 on Fashion-MNIST (README, "What a run does"); the
#: best-known accuracy over both is the headline
DEFAULT_ATTACKS = ({"name": "pgd", "steps": 20}, {"name": "autoattack", "version": "standard"})
DEFAULT_PROTOCOLS = ("non-adaptive", "adaptive")
SUBSET_SEED = 0
SUBSET_RULE = f"first n of a fixed permutation (seed {SUBSET_SEED})"
POLL_SECONDS = 1.0  # how often the cells other processes compute are checked, at the end of a grid
OTHER_PROCESS = "computed by another process"


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
    attacks: tuple[Mapping[str, Any], ...] = DEFAULT_ATTACKS
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
    batch_size: int | str = 128  # or "auto" (harness.evaluation.batching)
    #: channels-last inputs and bfloat16 autocast (harness.evaluation.precision); keyed only when on
    channels_last: bool = False
    autocast: str | None = None
    force: bool = False
    allow_train: bool = True
    train_seed: int = 0
    data_root: str | None = None
    artifact_root: str | None = None
    progress: bool = True
    #: ``local`` (in this process) or ``ray`` (shards of samples on a Ray cluster, ``address`` or a local one)
    executor: str = "local"
    address: str | None = None
    #: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; a cell computed on a GPU records it in its key
    device: str = "cpu"


@dataclass(frozen=True)
class CellOutcome:
    key: str
    defense: str
    variant: str
    protocol: str
    attack: str
    eps: str
    seed: int | None  # None only for an entry that failed before its cells could be planned
    status: str  # "done" (computed now) | "skipped" (already stored, or computed by another process) | "failed"
    clean_acc: float | None
    robust_acc: float | None
    train_dataset: str | None = None  # set when the purifier was trained on another dataset
    #: the requested protocols this cell answers (several for an entry without a purifier)
    requested: tuple[str, ...] = ()
    error: str = ""  # why a failed cell failed: the exception type and the first line of its message
    note: str = ""  # e.g. "computed by another process"


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM (``signum``) after committing the batch in flight; it is marked
    ``interrupted``, and a rerun resumes inside the cell it was in."""

    def __init__(self, done: int, signum: int):
        super().__init__(f"interrupted: {done} cells done, rerun to resume")
        self.done, self.signum = done, signum


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
    bind: Callable[[Attack], Attack] | None = None  # hands a transfer attack its source model

    def attack_instance(self) -> Attack:
        """The attack the cell runs (the protocol drops EOT draws that would repeat fixed noise)."""
        attack = build_attack(self.attack, self.threat)
        return self.protocol.attack_for(self.bind(attack) if self.bind else attack)

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


def _validate(request: RunRequest, entries: list[DefenseEntry], registry: Registry[DefenseEntry] | None = None,
              classifiers: bool = True) -> tuple[list[Protocol], list[ThreatModel]]:
    """Check every axis before anything runs, so bad input costs nothing, trains nothing and stores
    nothing: names, numbers (eps within the image cube, n within the test split), options, and (unless
    ``classifiers`` is False: a plan names them without loading) the base classifiers' sources (a
    classifier file is read, never unpickled beyond tensors)."""
    info = dataset_info(request.dataset)
    transfers = [d for d in request.train_datasets if d not in (None, request.dataset)]
    for name in transfers:
        dataset_info(name)
    _check_axes(request)
    protocols = [get_protocol(name) for name in request.protocols]
    threats = [ThreatModel(request.threat, Epsilon.parse(e)) for e in request.eps]
    for threat in threats:
        threat.check_image_shape(info.image_shape, info.name)
    for variant in request.variants:
        parse_variant(variant)
    attacks = [build_attack(spec, threat) for threat, spec in itertools.product(threats, request.attacks)]
    _check_options(request, entries)
    source_base = check_sources(source_names(attacks), registry or defense_registry(), request.dataset,
                                request.preset, request.options)
    for entry in entries:
        entry.check_dataset(request.dataset)
        entry.resolve_preset(request.preset)
        for name in transfers:
            check_transferable(entry, name)
        for protocol in protocols:
            protocol_for(protocol, entry).check(entry)
    _check_counts(request)
    check_executor(request.executor, request.address)
    if request.executor == "local":
        resolve_device(request.device)
    Precision(request.channels_last, request.autocast)
    size = _test_size(request)
    if request.n > size:
        raise UsageError(f"--n {request.n} is more than the {size} images of the {request.dataset} test split; "
                         f"valid: 1 to {size}")
    if not classifiers:
        return protocols, threats
    check = dict(artifacts=ArtifactCache(request.artifact_root), data_root=request.data_root, seed=request.train_seed)
    if source_base or any(entry.uses_base_classifier for entry in entries):
        check_classifier(request.classifier, info, **check)
    if any(entry.kind is Kind.PURIFIER for entry in entries):
        for name in transfers:
            check_classifier(request.train_classifier or request.classifier, dataset_info(name), **check)
    return protocols, threats


def _check_axes(request: RunRequest) -> None:
    """Every axis of the grid has a value: an empty one would plan no cell, yet train and record a run."""
    axes = {"--eps": (request.eps, lambda: "give at least one, like 8/255 or 0.0314"),
            "--attack": (request.attacks, lambda: f"valid: {', '.join(attack_registry().names())}"),
            "--protocol": (request.protocols, lambda: f"valid: {', '.join(protocol_registry().names())}"),
            "--variant": (request.variants,
                          lambda: f"valid: {', '.join(k.value.syntax for k in variant_registry().items())}"),
            "--seed": (request.seeds, lambda: "give at least one, like 0"),
            "--train-dataset": (request.train_datasets, lambda: f"valid: same, {', '.join(dataset_names())}")}
    for option, (values, valid) in axes.items():
        if not values:
            raise UsageError(f"{option} names no value; {valid()}")


def _check_counts(request: RunRequest) -> None:
    """``n`` and the batch size are whole numbers >= 1; seeds are whole numbers the store can hold."""
    for option, value in (("--n", request.n), ("--batch-size", request.batch_size)):
        if option == "--batch-size" and value == AUTO:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{option} must be a whole number >= 1{' or auto' * (option == '--batch-size')}, "
                             f"got {value!r}")
    for seed in request.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 63:
            raise UsageError(f"--seed must be a whole number from -2**63 to 2**63-1, got {seed!r}")


def _test_size(request: RunRequest) -> int:
    """How many images the test split holds: from the stored meta, without loading the images."""
    try:
        return int(read_meta(data_root(request.data_root), request.dataset)["splits"]["test"]["n"])
    except (TypeError, KeyError, ValueError):  # not stored yet (a mirror import) or damaged: load says which
        return len(load_split(request.dataset, "test", request.data_root).labels)


#: the fields of a cell's config that its key hashes (``key_config`` in :func:`plan_cells`; the rest of a
#: stored config is provenance). Keep in step with ``key_config``: tests/test_submissions.py checks it.
KEY_FIELDS = ("defense", "classifier", "dataset", "threat", "attack", "protocol", "n", "seed")
#: key fields present only when set, so every cell stored before them keeps its key: the device type of a
#: cell computed on something other than the CPU (a GPU's kernels and noise generators give other numbers)
#: and a precision other than float32 (channels_last, bfloat16 autocast)
OPTIONAL_KEY_FIELDS = ("device", "precision")


def cell_key(config: Mapping[str, Any]) -> str:
    """The key of the cell whose stored config (or key config) is ``config``, recomputed from it (a
    missing field is a KeyError naming it)."""
    optional = {name: config[name] for name in OPTIONAL_KEY_FIELDS if config.get(name)}
    return content_hash({**{name: config[name] for name in KEY_FIELDS}, **optional}, CELL_KEY_LENGTH)


def plan_cells(request: RunRequest, entry: DefenseEntry, protocols: list[Protocol], threats: list[ThreatModel],
               network_id: str, splits: dict[str, Split], sources: dict[str | None, TrainSource | None],
               bind: Callable[[Attack], Attack] | None = None, device_type: str = "cpu") -> list[_PlannedCell]:
    """The cells of ``entry`` in ``request``'s grid, keyed (pure: nothing is built, loaded or stored).
    ``network_id`` names the network the cells evaluate, ``splits`` are the test split's variants,
    ``sources`` the datasets the entry is trained on, ``bind`` hands transfer attacks their source and
    ``device_type`` is what the cells compute on (keyed unless ``cpu``); both ``harness run`` and
    ``harness plan`` key cells here, so their keys agree."""
    preset = entry.resolve_preset(request.preset)
    options = entry.select_options(request.options)
    precision = Precision(request.channels_last, request.autocast).describe()
    cells: dict[str, _PlannedCell] = {}
    for source, (variant, test), threat, spec, asked, seed in itertools.product(
            sources.values(), splits.items(), threats, request.attacks, protocols, request.seeds):
        protocol = protocol_for(asked, entry)
        attack = build_attack(spec, threat)
        attack = protocol.attack_for(bind(attack) if bind else attack)
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
            "n": request.n, "seed": seed,  # within the split: checked by _validate
            **({"precision": precision} if precision else {}),
        }
        if device_type != "cpu":
            key_config["device"] = device_type
        cell = _PlannedCell(entry, preset, options, source, protocol, (asked.name,), threat, spec, seed, test,
                            key_config, bind)
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


def _cell_config(planned: _PlannedCell, network: _Network, defense: Defense | None,
                 metadata: dict[str, Any]) -> dict[str, Any]:
    """A cell's stored config: its key config and provenance (what only a built defense tells is left out
    when ``defense`` is None, i.e. its build failed)."""
    config = dict(planned.key_config, entry=metadata, protocol_tier=planned.protocol.tier,
                  classifier_provenance=network.provenance, data_source=planned.split.source)
    if defense is not None:
        part = defense.purifier if defense.has_purifier else defense.classifier
        config["entry"] = dict(metadata, parameters={"classifier": _parameters(defense.classifier),
                                                     "purifier": _parameters(defense.purifier)})
        config["defense_provenance"] = getattr(part, "provenance", None)
        config["weights_fingerprint"] = weights_fingerprint(defense)  # provenance, not part of the key
    note = _protocol_note(planned)
    if note:
        config["protocol_note"] = note
    transfer = attack_note(planned.attack_instance())
    if transfer:
        config["attack_note"] = transfer
    return config


def _open_cell(session: Session, planned: _PlannedCell, run: Run, network: _Network, defense: Defense | None,
               metadata: dict[str, Any], force: bool) -> Cell:
    """The planned cell's row for ``run``: created, or reopened (``running``, its samples kept unless
    ``force``) when it is stored unfinished or failed."""
    config = _cell_config(planned, network, defense, metadata)
    cell = find_cell(session, planned.key)
    if cell is not None:
        if force:
            reset_cell(session, cell)
        cell.run_id, cell.status, cell.error = run.id, "running", ""
        if defense is not None:
            cell.config = config
        return cell
    attack = planned.attack_instance()
    test = planned.split
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


@dataclass
class _Worker:
    """What computing cells needs in this process: the session, the run, the claims and the signals."""

    session: Session
    run: Run
    claims: Claims
    signals: Signals
    executor: Executor


def _store_group(worker: _Worker, cell: Cell, group: list[BatchResult]) -> bool:
    """Commit a group of batches (one for ``local``, a shard for ``ray``): their samples, flags and the
    cell's running totals, with a heartbeat of the cell's claim in the same transaction; False (nothing
    written) if the claim is no longer ours."""
    session = worker.session
    if not worker.claims.touch(session, cell.key):
        session.rollback()
        return False
    for result in group:
        if result.flags is not None:
            cell.metrics = {**(cell.metrics or {}), "flags": result.flags}
        cell.n_done += add_samples(session, cell, result.rows)
        cell.seconds += result.seconds
        if result.quality is not None:
            cell.metrics = merge_quality(cell.metrics, result.quality)
    session.commit()
    return True


def cell_work(planned: _PlannedCell, defense: Defense, device: torch.device, precision: Precision,
              share: bool = True) -> CellWork:
    """What evaluating ``planned``'s batches needs: its attack and its defense on ``device``, in
    ``precision``, checked, and sharing its clean work with the other cells of the same built defense
    (:mod:`harness.evaluation.sharing`) unless ``share`` is off."""
    shared = shared_defense(defense, planned.split.info.num_classes, precision, precision.apply).to(device)
    return CellWork(planned.entry, planned.protocol, planned.threat, planned.attack_instance(), planned.seed,
                    planned.split, shared, device, data=content_hash(planned.key_config["dataset"]), share=share)


def _flagged_random(cell: Cell) -> bool:
    """Whether the cell's first batch found randomness outside the noise argument (no sharing then)."""
    return any(flag.get("name") == "randomness" for flag in (cell.metrics or {}).get("flags", []))


def _prepare(planned: _PlannedCell) -> None:
    """Build (training if needed) a transfer attack's source model here, before workers load it."""
    attack = planned.attack_instance()
    if isinstance(attack, SourcedAttack) and attack.source_model is not None:
        attack.source_model.target(planned.seed)


def worker_request(request: RunRequest) -> RunRequest:
    """``request`` as workers rebuild cells from it: its data and artifact roots resolved here (a worker
    may not share this process's environment), nothing trained, no progress bars."""
    return replace(request, data_root=str(data_root(request.data_root)),
                   artifact_root=str(artifact_root(request.artifact_root)), allow_train=False, progress=False,
                   force=False)


def _execute(worker: _Worker, cell: Cell, planned: _PlannedCell, defense: Defense, grid: _Grid) -> None:
    """Evaluate the cell's missing samples through the run's executor, committing each group of batches
    as it arrives, then finish it."""
    session, request = worker.session, grid.request
    work = cell_work(planned, defense, grid.device, Precision(request.channels_last, request.autocast),
                     share=not _flagged_random(cell))
    done = done_indices(session, cell)
    todo = [i for i in evaluation_subset(len(planned.split.labels), cell.n).tolist() if i not in done]
    target = functools.partial(planned.protocol.target, planned.entry, work.defense, planned.seed)
    size = resolve_batch_size(request.batch_size, target, planned.split, todo, work.defense)
    batches = [todo[i:i + size] for i in range(0, len(todo), size)]
    job = CellJob(cell.key, batches, first=not done, local=lambda: work,
                  rebuild={"request": worker_request(request), "entry": planned.entry.name, "key": cell.key},
                  rebuild_with=rebuild_cell_work,
                  prepare=functools.partial(_prepare, planned))
    label = f"{cell.defense} {cell.protocol} {cell.attack_label} eps={cell.eps_text} seed={cell.seed}"
    with worker.signals.deferred(), tqdm(total=len(batches), desc=label, disable=not request.progress,
                                         unit="batch") as bar:
        for group in worker.executor.evaluate(job):
            if not retry_locked(session, functools.partial(_store_group, worker, cell, group)):
                raise ClaimLost(cell.key)
            bar.update(len(group))
            worker.signals.check()
    retry_locked(session, lambda: finish_cell(session, cell))


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
    transfer: TransferSources | None = None  # the source models of transfer attacks
    device: torch.device = torch.device("cpu")  # what this process computes on

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


def check_request(request: RunRequest, registry: Registry[DefenseEntry] | None = None, *, classifiers: bool = True
                  ) -> tuple[list[DefenseEntry], list[Protocol], list[ThreatModel]]:
    """Check every axis of ``request`` as :func:`run_grid` does first, without opening any store: bad
    input then creates no results DB either. Returns the entries, protocols and threat models of the
    grid; ``classifiers=False`` leaves the base classifiers' sources unchecked (nothing is loaded)."""
    registry = registry or defense_registry()
    entries = _entries(request, registry)
    return (entries, *_validate(request, entries, registry, classifiers))


def variant_splits(request: RunRequest, test: Split) -> dict[str, Split]:
    """The test split's variants of ``request``, by variant name."""
    return {variant: apply_variant(test, variant, request.variant_seed) for variant in request.variants}


def _make_grid(request: RunRequest, registry: Registry[DefenseEntry], protocols: list[Protocol],
               threats: list[ThreatModel], device: torch.device, here: torch.device | None = None) -> _Grid:
    """What every entry of ``request`` shares: the test split and its variants, the artifact cache, the
    base classifiers and the transfer sources (each loaded or built on first need). ``device`` is what
    the cells compute on, ``here`` what this process runs transfer sources on (default ``device``)."""
    test = load_split(request.dataset, "test", request.data_root)
    artifacts = ArtifactCache(request.artifact_root, allow_train=request.allow_train)
    classifiers = _Classifiers(request, artifacts)
    transfer = TransferSources(registry, test.info, artifacts, lambda: classifiers.get(request.classifier, test.info),
                               preset=request.preset, options=request.options, data_root=request.data_root,
                               progress=request.progress, seed=request.train_seed, device=here or device)
    return _Grid(request, registry, protocols, threats, test, variant_splits(request, test), artifacts, classifiers,
                 transfer, device)


def run_grid(request: RunRequest, engine: Engine, registry: Registry[DefenseEntry] | None = None
             ) -> list[CellOutcome]:
    """Evaluate every cell of ``request`` that is not stored yet; return one outcome per cell. A cell that
    raises is stored as failed and the grid goes on; the cells other live processes are computing are
    waited for at the end; SIGINT/SIGTERM stop the run at a batch boundary (:class:`Interrupted`)."""
    registry = registry or defense_registry()
    entries = _entries(request, registry)
    protocols, threats = _validate(request, entries, registry)
    timeout = claim_timeout()
    executor = make_executor(request.executor, address=request.address,
                             registry=None if registry is defense_registry() else registry)
    slots: list[_Slot] = []
    with executor, Session(engine, expire_on_commit=False) as session, Claims(engine, timeout) as claims, \
            Signals() as signals:
        device = executor.device(request.device)
        grid = _make_grid(request, registry, protocols, threats, device, executor.driver_device(device))
        provenance = {**code_provenance(), "device": executor.describe_device(request.device)[:64]}
        run = retry_locked(session, lambda: new_run(session, shlex.join(sys.argv), provenance))
        worker = _Worker(session, run, claims, signals, executor)
        try:
            for entry in entries:
                _attempt_entry(worker, grid, entry, slots)
            _await_others(slots)
        except KeyboardInterrupt:
            _finish(worker, "interrupted")
            done = sum(1 for slot in slots if slot.outcome is not None and slot.outcome.status != "failed")
            raise Interrupted(done, signals.received or signal.SIGINT) from None
        except BaseException:
            _finish(worker, "failed")
            raise
        outcomes = [slot.outcome for slot in slots if slot.outcome is not None]
        _finish(worker, "failed" if any(o.status == "failed" for o in outcomes) else "done")
    return outcomes


#: a worker's rebuilt grids and entries, by what they were rebuilt from (the latest few)
_REBUILT: dict[tuple[Any, ...], Any] = {}
_REBUILT_KEEP = 8


def _remember(key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    if key not in _REBUILT:
        while len(_REBUILT) >= _REBUILT_KEEP:
            del _REBUILT[next(iter(_REBUILT))]
        _REBUILT[key] = make()
    return _REBUILT[key]


def rebuild_cell_work(spec: Mapping[str, Any], registry: Registry[DefenseEntry] | None,
                      device: torch.device) -> CellWork:
    """Worker side: the cell ``spec["key"]`` of entry ``spec["entry"]`` in the grid of ``spec["request"]``
    (a :func:`worker_request`), rebuilt through ``registry`` (default: the installed one) and the artifact
    cache, which holds everything it needs (the driver trained it; nothing is trained here). The grid and
    the entry's network and defenses are kept for the worker's next shards of the same run
    (``spec["run"]``)."""
    request: RunRequest = spec["request"]
    registry = registry or defense_registry()
    names = tuple(d if isinstance(d, str) else d.name for d in request.defenses)
    grid_key = (spec.get("run"), repr(replace(request, defenses=names)), tuple(registry.names()), str(device))
    protocols = [get_protocol(name) for name in request.protocols]
    threats = [ThreatModel(request.threat, Epsilon.parse(e)) for e in request.eps]
    grid = _remember(grid_key, lambda: _make_grid(request, registry, protocols, threats, device))
    entry = next(e for e in _entries(request, registry) if e.name == spec["entry"])
    cells: _EntryCells = _remember(grid_key + (entry.name,), lambda: _EntryCells(None, grid, entry))
    item = next((i for i in cells.planned if i.key == spec["key"]), None)
    if item is None:
        raise RuntimeError(f"cell {spec['key']} is not in the grid this worker rebuilt: its harness, data or "
                           f"artifacts differ from the driver's")
    return cell_work(item, cells.defense(item), device, Precision(request.channels_last, request.autocast))


def _finish(worker: _Worker, status: str) -> None:
    session = worker.session
    session.rollback()
    retry_locked(session, lambda: finish_run(session, worker.run, status))


def _build(grid: _Grid, item: _PlannedCell, classifier: LoadedClassifier | None) -> Defense:
    r = grid.request
    kwargs = dict(options=item.options, data_root=r.data_root, progress=r.progress, seed=r.train_seed)
    if item.source is None:
        return build_defense(item.entry, item.preset, classifier, item.split.info, grid.artifacts, **kwargs)
    return build_transferred_defense(item.entry, item.preset, item.source.classifier, item.source.info,
                                     classifier, item.split.info, grid.artifacts, **kwargs)


@dataclass
class _Slot:
    """One cell of the grid: its outcome, None while another process computes it (``wait`` tries again)."""

    outcome: CellOutcome | None
    wait: Callable[[], CellOutcome | None] = lambda: None


def _error_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _log_failure(what: str, exc: BaseException) -> str:
    """Log a failure (one line, the traceback at debug level) and return its error line."""
    error = _error_line(exc)
    log.warning("%s failed: %s", what, error)
    log.debug("traceback of the failure of %s", what, exc_info=exc)
    return error


def _attempt_entry(worker: _Worker, grid: _Grid, entry: DefenseEntry, slots: list[_Slot]) -> None:
    """Attempt every cell of ``entry``, appending one slot per cell. An entry whose network cannot be
    prepared (its classifier, or its own network, raised) fails as a whole: none of its cells can be
    keyed, so nothing is stored for it."""
    try:
        cells = _EntryCells(worker, grid, entry)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - the entry fails alone
        error = _log_failure(f"defense {entry.name}", exc)
        slots.append(_Slot(CellOutcome("", entry.name, "", "", "", "", None, "failed", None, None, error=error)))
        return
    for item in cells.planned:
        slots.append(_Slot(cells.attempt(item), functools.partial(cells.attempt, item, waited=True)))


def _await_others(slots: list[_Slot]) -> None:
    """Poll the cells other processes held until each is settled: skipped once they stored it, failed if
    they failed it, or computed here if they stopped without finishing it. Bounded: a live owner keeps
    computing, and a dead owner's claim expires and is taken over."""
    pending = [slot for slot in slots if slot.outcome is None]
    if pending:
        log.info("waiting for %d cell(s) being computed by another process", len(pending))
    while pending:
        time.sleep(POLL_SECONDS)
        for slot in pending:
            slot.outcome = slot.wait()
        pending = [slot for slot in pending if slot.outcome is None]


def _stored(cell: Cell | None, force: bool) -> bool:
    return cell is not None and cell.status == "done" and not force


class _EntryCells:
    """One entry's planned cells and what computing them needs: its network, and its defenses, built on
    first need (a build that raises fails each cell of that defense)."""

    def __init__(self, worker: _Worker | None, grid: _Grid, entry: DefenseEntry):
        r = grid.request
        self.worker, self.grid, self.entry = worker, grid, entry
        own: OwnNetwork | None = None
        self.classifier: LoadedClassifier | None = None
        if entry.uses_base_classifier:
            self.classifier = grid.classifiers.get(r.classifier, grid.test.info)
            self.network = _Network(self.classifier.id, self.classifier.provenance)
        else:
            own = own_network(entry, entry.resolve_preset(r.preset), grid.test.info, grid.artifacts,
                              options=entry.select_options(r.options), data_root=r.data_root, progress=r.progress,
                              seed=r.train_seed)
            self.network = _Network(own.id, own.provenance)
        self.own = own
        sources = grid.sources(entry) if entry.kind is Kind.PURIFIER else {None: None}
        self.planned = plan_cells(r, entry, grid.protocols, grid.threats, self.network.id, grid.splits, sources,
                                  grid.transfer.bind if grid.transfer else None, grid.device.type)
        self.metadata = _entry_metadata(entry, grid.registry)
        self.defenses: dict[str | None, Defense | Exception] = {None: own.defense} if own and own.defense else {}

    def attempt(self, item: _PlannedCell, waited: bool = False) -> CellOutcome | None:
        """Compute ``item`` under a claim unless it is stored; None while another live process holds the
        claim. ``waited``: the cell was held by another process earlier in this run (no ``force`` then)."""
        force = self.grid.request.force and not waited
        before = find_cell(self.worker.session, item.key)
        if _stored(before, force):
            log.info("skipping finished cell %s (%s %s)", item.key, self.entry.name, item.protocol.name)
            return self._outcome(item, before, "skipped", OTHER_PROCESS if waited else "")
        claims, signals = self.worker.claims, self.worker.signals
        claimed = False
        try:
            with signals.deferred():
                claimed = claims.acquire(item.key)
            return self._claimed(item, force, force and _stored(before, False), waited) if claimed else None
        finally:
            if claimed:
                with signals.deferred():
                    claims.release(item.key)

    def _claimed(self, item: _PlannedCell, force: bool, recompute: bool, waited: bool) -> CellOutcome | None:
        """:meth:`attempt` once the claim is ours; ``recompute``: the cell was done and ``force`` redoes it."""
        cell = find_cell(self.worker.session, item.key)  # as stored now that the claim is ours
        if _stored(cell, recompute):
            return self._outcome(item, cell, "skipped", OTHER_PROCESS)
        if (waited and cell is not None and cell.status == "failed" and cell.finished_at is not None
                and cell.finished_at >= self.worker.run.started_at):
            return self._outcome(item, cell, "failed", OTHER_PROCESS)
        try:
            return self._outcome(item, self._compute(item, force), "done")
        except ClaimLost:
            log.warning("cell %s was taken over by another process", item.key)
            return None
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - the cell fails alone
            return self._outcome(item, self._fail(item, exc), "failed")

    def _compute(self, item: _PlannedCell, force: bool) -> Cell:
        defense = self.defense(item)
        self._note_training()
        session = self.worker.session

        def open_cell() -> Cell:
            cell = _open_cell(session, item, self.worker.run, self.network, defense, self.metadata, force)
            session.commit()
            return cell

        cell = retry_locked(session, open_cell)
        _execute(self.worker, cell, item, defense, self.grid)
        return cell

    def _note_training(self) -> None:
        """Once a harness-trained network exists, its training record (cost, metrics) joins the
        provenance every cell of it stores."""
        if self.own is not None and "training" not in self.network.provenance:
            record = training_record(self.own, self.grid.artifacts)
            if record is not None:
                self.network = _Network(self.network.id, {**self.network.provenance, "training": record})

    def defense(self, item: _PlannedCell) -> Defense:
        """The defense of ``item``'s training source, built once; raises what its build raised."""
        source = item.source.info.name if item.source else None
        if source not in self.defenses:
            try:
                self.defenses[source] = _build(self.grid, item, self.classifier)
            except UsageError:
                raise
            except Exception as exc:  # noqa: BLE001 - fails every cell of this defense, one by one
                self.defenses[source] = exc
        built = self.defenses[source]
        if isinstance(built, Exception):
            raise built
        return built

    def _fail(self, item: _PlannedCell, exc: Exception) -> Cell:
        """Store ``item`` as failed with the error of ``exc`` (its committed batches are kept)."""
        error = _log_failure(f"cell {item.key} ({self.entry.name} {item.protocol.name} seed {item.seed})", exc)
        session = self.worker.session
        session.rollback()

        def write() -> Cell:
            cell = _open_cell(session, item, self.worker.run, self.network, None, self.metadata, False)
            fail_cell(session, cell, error)
            return cell

        return retry_locked(session, write)

    def _outcome(self, item: _PlannedCell, cell: Cell, status: str, note: str = "") -> CellOutcome:
        return CellOutcome(cell.key, self.entry.name, cell.variant, cell.protocol, cell.attack_label,
                           cell.eps_text, cell.seed, status, cell.clean_acc, cell.robust_acc,
                           item.source.info.name if item.source else None, item.requested, cell.error, note)

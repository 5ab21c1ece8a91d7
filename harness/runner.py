"""Plan cells -> skip finished ones -> execute the rest batch by batch -> persist.

A cell is (defense@version+preset [+ the dataset its purifier was trained on, when that is another one],
classifier, dataset@fingerprint, variant, threat, eps, attack@params, protocol, n, seed); its key is a
hash of exactly that. Per-sample results are committed one batch at a
time, so an interrupted run resumes inside the cell it was in.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from tqdm import tqdm

from harness.artifacts import ArtifactCache, canonical_json
from harness.attacks.base import Attack, perturbation_norm
from harness.attacks.factory import build_attack
from harness.building import build_defense, build_transferred_defense, check_transferable, resolve_preset
from harness.classifiers import DEFAULT_CLASSIFIER, LoadedClassifier, resolve_classifier
from harness.data import DatasetInfo, Split, dataset_info, load_split
from harness.data.variants import apply_variant, parse_variant
from harness.metrics import batch_quality, merge_quality
from harness.noise import FixedNoise
from harness.errors import UsageError
from harness.protocols import Protocol, get_protocol
from harness.provenance import code_provenance
from harness.registry import Defense, DefenseEntry, Kind, Registry, default_registry
from harness.store import Cell, Run, SampleResult, add_samples, done_indices, find_cell, reset_cell, utcnow
from harness.threat import Epsilon, ThreatModel

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
    """Everything ``harness run`` was asked for; several values on an axis make a grid."""

    defenses: tuple[str, ...]
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
    source: TrainSource | None  # None: trained on the evaluation dataset
    protocol: Protocol
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
        return hashlib.sha256(canonical_json(self.key_config).encode()).hexdigest()[:32]


def _validate(request: RunRequest, registry: Registry) -> tuple[list[DefenseEntry], list[Protocol], list[ThreatModel]]:
    """Check every axis before anything runs, so bad input costs nothing and stores nothing."""
    if not request.defenses:
        raise UsageError(f"no defense given; valid: {', '.join(registry.names())}")
    entries = [registry.get(name) for name in request.defenses]
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
    for entry in entries:
        entry.check_dataset(request.dataset)
        resolve_preset(entry, request.preset if entry.presets else None)
        for name in transfers:
            check_transferable(entry, name)
        for protocol in protocols:
            protocol.check(entry)
    if request.n < 1:
        raise UsageError("--n must be at least 1")
    return entries, protocols, threats


def _plan(request: RunRequest, entry: DefenseEntry, protocols: list[Protocol], threats: list[ThreatModel],
          classifier_id: str, splits: dict[str, Split], sources: dict[str | None, TrainSource | None]
          ) -> list[_PlannedCell]:
    preset = resolve_preset(entry, request.preset if entry.presets else None)
    cells = []
    for source, (variant, test), threat, spec, protocol, seed in itertools.product(
            sources.values(), splits.items(), threats, request.attacks, protocols, request.seeds):
        attack = protocol.attack_for(build_attack(spec, threat))
        dataset = {"name": test.info.name, "split": test.split, "fingerprint": test.fingerprint,
                   "variant": variant, "subset": SUBSET_RULE}
        if variant == "colored":
            dataset["variant_seed"] = request.variant_seed
        key_config = {
            "defense": {"name": entry.name, "version": entry.version, "preset": preset,
                        "preset_config": entry.preset_config(preset), "options": dict(request.options),
                        "train_seed": request.train_seed, **(source.describe() if source else {})},
            "classifier": classifier_id,
            "dataset": dataset,
            "threat": threat.describe(), "attack": attack.params(), "protocol": protocol.name,
            "n": min(request.n, len(test.labels)), "seed": seed,
        }
        cells.append(_PlannedCell(entry, preset, source, protocol, threat, spec, seed, test, key_config))
    # e.g. pgd and pgd:eot=4 under a fixed-randomness protocol are the same attack, hence the same cell
    return list({cell.key: cell for cell in cells}.values())


def _entry_metadata(entry: DefenseEntry) -> dict[str, Any]:
    return {"name": entry.name, "version": entry.version, "kind": entry.kind.value, "paper": entry.paper,
            "citation": entry.citation, "stochastic": entry.stochastic,
            "differentiable": entry.differentiable,
            "reported": [r.__dict__ for r in entry.reported]}


def _open_cell(session: Session, planned: _PlannedCell, run: Run, classifier: LoadedClassifier,
               defense: Defense, force: bool) -> Cell:
    cell = find_cell(session, planned.key)
    if cell is not None:
        if force:
            reset_cell(session, cell)
        cell.run_id = run.id
        return cell
    attack = planned.attack_instance()
    test = planned.split
    config = dict(planned.key_config, entry=_entry_metadata(planned.entry), protocol_tier=planned.protocol.tier,
                  classifier_provenance=classifier.provenance, data_source=test.source,
                  defense_provenance=getattr(defense.purifier, "provenance", None))
    cell = Cell(key=planned.key, run_id=run.id, defense=planned.entry.name,
                defense_version=planned.entry.version, preset=planned.preset or "",
                classifier=classifier.id, dataset=test.info.name, dataset_fingerprint=test.fingerprint,
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
    _finalise(session, cell)


def _finalise(session: Session, cell: Cell) -> None:
    rows = session.execute(select(SampleResult.label, SampleResult.clean_pred, SampleResult.adv_pred)
                           .where(SampleResult.cell_id == cell.id)).all()
    labels, clean, adv = (torch.tensor(col) for col in zip(*rows))
    clean_ok = clean == labels
    cell.clean_acc = clean_ok.float().mean().item()
    cell.robust_acc = (clean_ok & (adv == labels)).float().mean().item()
    cell.avg_acc = (cell.clean_acc + cell.robust_acc) / 2
    cell.status, cell.finished_at, cell.n_done = "done", utcnow(), len(rows)
    session.commit()


def _start_run(session: Session) -> Run:
    prov = code_provenance()
    run = Run(command=shlex.join(sys.argv), git_commit=prov["git_commit"], git_dirty=prov["git_dirty"],
              harness_version=prov["harness_version"], packages=prov["packages"], device=prov["device"],
              host=prov["host"])
    session.add(run)
    session.commit()
    return run


def run_grid(request: RunRequest, engine: Engine, registry: Registry | None = None) -> list[CellOutcome]:
    """Evaluate every cell of ``request`` that is not stored yet; return one outcome per cell."""
    registry = registry or default_registry()
    entries, protocols, threats = _validate(request, registry)
    test = load_split(request.dataset, "test", request.data_root)
    artifacts = ArtifactCache(request.artifact_root, allow_train=request.allow_train)
    classifier = resolve_classifier(request.classifier, test.info, artifacts=artifacts,
                                    data_root=request.data_root, threat=request.threat,
                                    progress=request.progress, seed=request.train_seed)
    splits = {variant: apply_variant(test, variant, request.variant_seed) for variant in request.variants}
    sources = {name: _train_source(request, name, artifacts) for name in dict.fromkeys(request.train_datasets)}
    outcomes: list[CellOutcome] = []
    with Session(engine, expire_on_commit=False) as session:
        run = _start_run(session)
        try:
            for entry in entries:
                outcomes += _run_entry(session, run, request, entry, protocols, threats, classifier, splits,
                                       sources, artifacts)
        except BaseException:
            session.rollback()
            run.status, run.finished_at = "interrupted", utcnow()
            session.commit()
            raise
        run.status, run.finished_at = "done", utcnow()
        session.commit()
    return outcomes


def _train_source(request: RunRequest, name: str | None, artifacts: ArtifactCache) -> TrainSource | None:
    """The training dataset and classifier of purifiers transferred from ``name`` (``None``: no transfer)."""
    if name in (None, request.dataset):
        return None
    info = dataset_info(name)
    classifier = resolve_classifier(request.train_classifier or request.classifier, info, artifacts=artifacts,
                                    data_root=request.data_root, threat=request.threat,
                                    progress=request.progress, seed=request.train_seed)
    return TrainSource(info, load_split(name, "train", request.data_root).fingerprint, classifier)


def _build(request: RunRequest, item: _PlannedCell, classifier: LoadedClassifier,
           artifacts: ArtifactCache) -> Defense:
    kwargs = dict(options=request.options, data_root=request.data_root, progress=request.progress,
                  seed=request.train_seed)
    if item.source is None:
        return build_defense(item.entry, item.preset, classifier, item.split.info, artifacts, **kwargs)
    return build_transferred_defense(item.entry, item.preset, item.source.classifier, item.source.info,
                                     classifier, item.split.info, artifacts, **kwargs)


def _run_entry(session: Session, run: Run, request: RunRequest, entry: DefenseEntry,
               protocols: list[Protocol], threats: list[ThreatModel], classifier: LoadedClassifier,
               splits: dict[str, Split], sources: dict[str | None, TrainSource | None],
               artifacts: ArtifactCache) -> list[CellOutcome]:
    planned = _plan(request, entry, protocols, threats, classifier.id, splits, sources)
    defenses: dict[str | None, Defense] = {}  # built on first need, per training dataset
    outcomes = []
    for item in planned:
        cell = find_cell(session, item.key)
        status = "skipped"
        if cell is None or cell.status != "done" or request.force:
            source = item.source.info.name if item.source else None
            if source not in defenses:
                defenses[source] = _build(request, item, classifier, artifacts)
            defense = defenses[source]
            cell = _open_cell(session, item, run, classifier, defense, request.force)
            session.commit()
            _execute(session, cell, item, defense, request)
            status = "done"
        else:
            log.info("skipping finished cell %s (%s %s)", item.key, entry.name, item.protocol.name)
        outcomes.append(CellOutcome(cell.key, entry.name, cell.variant, cell.protocol, cell.attack_label, cell.eps_text,
                                    cell.seed, status, cell.clean_acc, cell.robust_acc,
                                    item.source.info.name if item.source else None))
    return outcomes


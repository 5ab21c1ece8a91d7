"""``harness verify``: recompute stored cells from their stored configs and compare them sample by sample.

A cell's stored config holds everything that determined it (:data:`~harness.evaluation.runner.KEY_FIELDS`:
the defense with its version, preset, options and training seed, the network, the dataset with its
fingerprint and variant, the threat model, the attack's parameters, the protocol, n and the seed) and its
provenance (the network's recipe, the weights' fingerprint). :func:`request_for` turns it back into the
:class:`~harness.evaluation.runner.RunRequest` that computes exactly that cell, and :func:`recompute_cell`
runs it through the normal runner into a scratch store (a temporary SQLite file), so a verification
exercises the code path of ``harness run`` itself; the verified store is only read.

With ``samples=M`` only a random subset is recomputed: the runner resumes a cell inside it, so the
scratch store is given a copy of the cell with every stored sample except those of the evaluation
batches that hold the M chosen ones, and the runner computes just those batches. Whole batches, because
what a batch holds can change a sample's result (AutoAttack draws its random starts per batch, and CPU
kernels may pick other algorithms for other batch sizes); pass the ``batch_size`` the cell was computed
with (``harness run``'s default, 128, unless it was changed).

Each sample is compared on its label, its clean and adversarial predictions, whether it was correct and
whether it was fooled; its perturbation norm is reported as the largest difference. The weights'
fingerprint (:func:`~harness.evaluation.building.weights_fingerprint`, stored by the runner in every
cell's config) says whether the recomputation used the same weights: results that differ with weights
that match are "other results"; with weights that differ (e.g. a recipe retrained on another machine)
they are "other weights".
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from harness.attacks.catalog import attack_registry
from harness.classifiers.sources import DEFAULT_CLASSIFIER
from harness.core.entry import DefenseEntry, defense_registry
from harness.core.errors import UsageError
from harness.core.paths import data_root
from harness.core.registry import Registry
from harness.data import load_split
from harness.data.disk import read_meta
from harness.evaluation.runner import KEY_FIELDS, OPTIONAL_KEY_FIELDS, RunRequest, evaluation_subset, run_grid
from harness.results.database import open_db, resolve_url
from harness.results.queries import add_samples, find_cell
from harness.results.schema import Cell, SampleResult

__all__ = ["SAMPLE_FIELDS", "StoredCell", "SampleDiff", "CellCheck", "read_only_engine", "stored_cells",
           "done_keys", "request_for", "attack_spec", "recompute_cell", "verify_store"]

log = logging.getLogger(__name__)
#: the per-sample fields a cell stores (besides its index), as the ORM names them
SAMPLE_FIELDS = ("label", "clean_pred", "adv_pred", "perturbation", "extra")
#: the Cell columns that are not copied to a scratch store (its own row id, the run that computed it)
_LOCAL_COLUMNS = ("id", "run_id")
#: how many disagreeing samples a check keeps for its message
_SHOWN = 5


@dataclass(frozen=True)
class StoredCell:
    """A finished cell, detached from any store: its columns (ORM attribute names, ``config`` among them,
    without the row id and run) and its samples by dataset index (each the :data:`SAMPLE_FIELDS`)."""

    columns: dict[str, Any]
    samples: dict[int, dict[str, Any]]

    @property
    def key(self) -> str:
        return self.columns["key"]

    @property
    def config(self) -> dict[str, Any]:
        return self.columns["config"]

    def label(self) -> str:
        """``defense protocol attack eps=... seed=...`` for messages."""
        c = self.columns
        return f"{c['defense']} {c['protocol']} {c['attack_label']} eps={c['eps_text']} seed={c['seed']}"


@dataclass(frozen=True)
class SampleDiff:
    """One sample whose recomputation disagrees with the stored one."""

    index: int
    stored: tuple[int, int, int]  # label, clean_pred, adv_pred
    recomputed: tuple[int, int, int]

    def describe(self) -> str:
        (label, c, a), (label2, c2, a2) = self.stored, self.recomputed
        where = f"label {label}->{label2}, " if label != label2 else ""
        return f"#{self.index}: {where}clean {c}->{c2}, adv {a}->{a2}"


@dataclass
class CellCheck:
    """The verification of one cell: how many samples were compared and how many agree on each outcome,
    whether the weights matched, and the error if the cell could not be recomputed."""

    key: str
    label: str
    compared: int = 0
    predictions: int = 0  # label, clean and adversarial prediction all equal
    correct: int = 0  # clean-correct equal
    fooled: int = 0  # fooled (clean-correct, then misclassified) equal
    max_perturbation_diff: float = 0.0
    weights: str = "not stored"  # match | differ | not stored (a cell stored before weights were hashed)
    weights_detail: str = ""
    chosen: int = 0  # the samples asked for (the whole cell: every sample)
    disagreements: list[SampleDiff] = field(default_factory=list)
    error: str = ""

    @property
    def agrees(self) -> bool:
        """Every compared sample agrees (and there was something to compare)."""
        return not self.error and self.compared > 0 and self.predictions == self.compared

    def describe(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["disagreements"] = [d.describe() for d in self.disagreements]
        out["agrees"] = self.agrees
        return out

    def line(self) -> str:
        """One line for the terminal."""
        head = f"cell {self.key} ({self.label})"
        if self.error:
            return f"{head}: not verified: {self.error}"
        scope = (f"{self.compared} samples recomputed ({self.chosen} chosen, with their batches)"
                 if self.chosen and self.chosen < self.compared else f"{self.compared} samples recomputed")
        if self.agrees:
            result = f"all agree ({scope})"
        else:
            shown = "; ".join(d.describe() for d in self.disagreements)
            result = (f"{self.compared - self.predictions} of {self.compared} samples disagree ({scope}; "
                      f"correct differs on {self.compared - self.correct}, fooled on {self.compared - self.fooled}"
                      f"{'; ' + shown if shown else ''})")
        weights = f"weights {self.weights}" + (f" ({self.weights_detail})" if self.weights_detail else "")
        if not self.agrees and self.weights == "differ":
            weights += ": other weights"
        elif not self.agrees and self.weights == "match":
            weights += ": other results"
        return f"{head}: {result}; {weights}; max perturbation difference {self.max_perturbation_diff:.3g}"


# -- reading the verified store ---------------------------------------------------------------------
def read_only_engine(url: str | None) -> Engine:
    """An engine that only reads the store at ``url`` (default ``$HARNESS_DB`` or ``./results.db``): a SQLite
    file is opened read-only (``mode=ro``), so it stays byte-identical; a missing file is a UsageError."""
    url = resolve_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "").expanduser()
        if not parsed.database or not path.is_file():
            raise UsageError(f"no results database at {path}; give --db with a store harness wrote")
        return create_engine(f"sqlite:///file:{path.resolve()}?mode=ro&uri=true")
    return create_engine(url)


def _columns(cell: Cell) -> dict[str, Any]:
    return {attr.key: getattr(cell, attr.key) for attr in Cell.__mapper__.column_attrs
            if attr.key not in _LOCAL_COLUMNS}


def _sample(row: SampleResult) -> dict[str, Any]:
    return {name: getattr(row, name) for name in SAMPLE_FIELDS}


def stored_cells(engine: Engine, keys: Iterable[str]) -> list[StoredCell]:
    """The cells ``keys`` with their samples, read (never written) from ``engine``; a key that is not
    stored is a UsageError."""
    out = []
    try:
        with Session(engine) as session:
            for key in keys:
                cell = session.scalar(select(Cell).where(Cell.key == key))
                if cell is None:
                    raise UsageError(f"no cell {key!r} in the results database")
                rows = session.scalars(select(SampleResult).where(SampleResult.cell_id == cell.id)
                                       .order_by(SampleResult.sample_index))
                out.append(StoredCell(_columns(cell), {row.sample_index: _sample(row) for row in rows}))
            session.rollback()
    except DBAPIError as exc:
        raise UsageError(f"cannot read the results database: {str(exc.orig).splitlines()[0]} (an older schema? "
                         f"`harness db upgrade` brings it up to date)") from None
    return out


def done_keys(engine: Engine, defenses: Sequence[str] = ()) -> list[str]:
    """The keys of every finished cell (of ``defenses``, when given), sorted (what :func:`verify_store`
    chooses from)."""
    query = select(Cell.key).where(Cell.status == "done")
    if defenses:
        query = query.where(Cell.defense.in_(list(defenses)))
    try:
        with Session(engine) as session:
            return sorted(session.scalars(query))
    except DBAPIError as exc:
        raise UsageError(f"cannot read the results database: {str(exc.orig).splitlines()[0]}") from None


# -- from a stored config back to a request ----------------------------------------------------------
def attack_spec(params: Mapping[str, Any]) -> dict[str, Any]:
    """The attack spec (``{"name": ..., option: value}``) whose attack has the stored ``params``: the
    params the attack's factory takes (a transfer attack's ``source`` is its entry's name); the others
    (``norm``, the library's version, ...) follow from the threat model and the code, and the rebuilt
    cell's key says whether they did."""
    name = params.get("name")
    registry = attack_registry()
    if not isinstance(name, str) or name not in registry.names():
        raise UsageError(f"stored attack {name!r} is not an attack of this harness; valid: "
                         f"{', '.join(registry.names())}")
    parameters = list(inspect.signature(registry.get(name)).parameters.values())[1:]
    takes = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    spec: dict[str, Any] = {"name": name}
    for key, value in params.items():
        if key in takes:
            spec[key] = value["entry"] if key == "source" and isinstance(value, Mapping) else value
    return spec


def _classifier_spec(config: Mapping[str, Any]) -> str:
    """The ``--classifier`` of a cell, from its network's provenance."""
    provenance = config.get("classifier_provenance") or {}
    source = provenance.get("source")
    if source == "trained":
        return f"trained:{provenance['recipe']['preset']}"
    if source == "file":
        path = Path(provenance["path"])
        if not path.is_file():
            raise UsageError(f"its classifier file {path} is not here")
        return str(path)
    if source == "robustbench":
        return f"robustbench:{provenance['name']}"
    if source == "entry":  # the entry's own network: no base classifier is loaded
        return DEFAULT_CLASSIFIER
    raise UsageError(f"its network's provenance names no source harness can load ({source!r}); valid: "
                     f"trained, file, robustbench, entry")


def _train_classifier(network_id: str | None, config: Mapping[str, Any], base: str) -> str | None:
    """The spec of the classifier a transferred purifier was trained against, from its id."""
    if not network_id:
        return None
    if network_id.startswith("trained:"):
        return network_id.split("@", 1)[0]
    if network_id.startswith("robustbench:"):
        return network_id
    if network_id == config.get("classifier"):
        return base
    raise UsageError(f"cannot tell where the classifier {network_id!r} its purifier was trained against comes from")


def request_for(config: Mapping[str, Any], *, batch_size: int = 128, allow_train: bool = True,
                data_root: str | None = None, artifact_root: str | None = None) -> RunRequest:
    """The request of exactly the cell whose stored config is ``config`` (one defense, one value on every
    axis, the training seed of its weights); a config that does not say enough is a UsageError."""
    try:
        defense, dataset, threat = config["defense"], config["dataset"], config["threat"]
        classifier = _classifier_spec(config)
        precision = config.get("precision") or {}
        return RunRequest(
            defenses=(defense["name"],), dataset=dataset["name"], classifier=classifier, threat=threat["norm"],
            eps=(threat["eps_text"],), attacks=(attack_spec(config["attack"]),), protocols=(config["protocol"],),
            n=int(config["n"]), seeds=(int(config["seed"]),), variants=(dataset["variant"],),
            variant_seed=int(dataset.get("variant_seed", 0)), preset=defense.get("preset"),
            train_datasets=(defense.get("train_dataset"),),
            train_classifier=_train_classifier(defense.get("train_classifier"), config, classifier),
            options=dict(defense.get("options") or {}), batch_size=batch_size, allow_train=allow_train,
            train_seed=int(defense.get("train_seed", 0)), data_root=data_root, artifact_root=artifact_root,
            channels_last=bool(precision.get("channels_last", False)), autocast=precision.get("autocast"),
            progress=False)
    except (KeyError, TypeError) as exc:
        raise UsageError(f"its stored config lacks {exc} (stored by an older harness?)") from None


# -- recomputing --------------------------------------------------------------------------------------
def _test_size(dataset: str, root: str | None) -> int:
    try:
        return int(read_meta(data_root(root), dataset)["splits"]["test"]["n"])
    except (TypeError, KeyError, ValueError):
        return len(load_split(dataset, "test", root).labels)


def _chosen_batches(stored: StoredCell, samples: int, rng: random.Random, batch_size: int,
                    root: str | None) -> tuple[list[int], set[int]]:
    """``(chosen indices, indices to recompute)``: ``samples`` of the cell's indices at random, and every
    index of the evaluation batches (the order ``harness run`` computes them in) that hold them."""
    order = evaluation_subset(_test_size(stored.columns["dataset"], root), int(stored.columns["n"])).tolist()
    chosen = sorted(rng.sample(sorted(stored.samples), min(samples, len(stored.samples))))
    batch_of = {index: position // batch_size for position, index in enumerate(order)}
    batches = {batch_of[i] for i in chosen if i in batch_of}
    return chosen, {index for index in order if batch_of[index] in batches}


def _seed_scratch(engine: Engine, stored: StoredCell, keep: set[int]) -> None:
    """Put the cell into the scratch store, unfinished, with the stored samples ``keep`` (the runner then
    resumes it and computes the others)."""
    with Session(engine) as session:
        columns = dict(stored.columns, status="running", n_done=len(keep), clean_acc=None, robust_acc=None,
                       avg_acc=None, finished_at=None, error="")
        cell = Cell(**columns)
        session.add(cell)
        session.flush()
        add_samples(session, cell, [{"sample_index": i, **stored.samples[i]} for i in sorted(keep)])
        session.commit()


def _weights(stored: Mapping[str, Any], recomputed: Mapping[str, Any]) -> tuple[str, str]:
    mine, theirs = stored.get("weights_fingerprint"), recomputed.get("weights_fingerprint")
    if not isinstance(mine, Mapping) or not isinstance(theirs, Mapping):
        return "not stored", "the stored cell predates weight fingerprints"
    if mine.get("defense") == theirs.get("defense"):
        return "match", str(mine.get("defense"))
    parts = [f"{part} {mine.get(part)} -> {theirs.get(part)}" for part in ("classifier", "purifier")
             if mine.get(part) != theirs.get(part)]
    return "differ", "; ".join(parts)


def _key_difference(stored: Mapping[str, Any], rebuilt: Mapping[str, Any]) -> str:
    fields = [name for name in KEY_FIELDS + OPTIONAL_KEY_FIELDS if stored.get(name) != rebuilt.get(name)]
    return ", ".join(fields) or "nothing visible"


def recompute_cell(stored: StoredCell, *, samples: int | None = None, rng: random.Random | None = None,
                   registry: Registry[DefenseEntry] | None = None, batch_size: int = 128, allow_train: bool = True,
                   data_root: str | None = None, artifact_root: str | None = None) -> CellCheck:
    """Recompute ``stored`` (all of it, or the batches of ``samples`` random ones) through the runner in a
    scratch store and compare it with what is stored. Nothing is written anywhere but the scratch store
    (and the artifact cache, if weights must be trained)."""
    check = CellCheck(stored.key, stored.label())
    registry = registry or defense_registry()
    rng = rng or random.Random(0)
    try:
        name = stored.config.get("defense", {}).get("name")
        if name not in registry.names():
            raise UsageError(f"defense {name!r} is not installed here; valid: {', '.join(registry.names())}")
        request = request_for(stored.config, batch_size=batch_size, allow_train=allow_train, data_root=data_root,
                              artifact_root=artifact_root)
        if samples is None or samples >= len(stored.samples):
            chosen, redo = sorted(stored.samples), set(stored.samples)
        else:
            chosen, redo = _chosen_batches(stored, samples, rng, batch_size, data_root)
        with tempfile.TemporaryDirectory(prefix="harness-verify-") as scratch:
            engine = open_db(str(Path(scratch) / "scratch.db"))
            try:
                keep = set(stored.samples) - redo
                if keep:
                    _seed_scratch(engine, stored, keep)
                outcomes = run_grid(request, engine, registry)
                with Session(engine) as session:
                    cell = find_cell(session, stored.key)
                    if cell is None or cell.status != "done":
                        if outcomes and outcomes[0].status == "failed":
                            raise UsageError(f"its recomputation failed: {outcomes[0].error}")
                        rebuilt = session.scalar(select(Cell).order_by(Cell.id.desc()))
                        raise UsageError(f"its config rebuilds another cell ({outcomes[0].key if outcomes else '?'}; "
                                         f"it differs in {_key_difference(stored.config, rebuilt.config) if rebuilt else '?'})")
                    rows = {row.sample_index: _sample(row) for row in session.scalars(
                        select(SampleResult).where(SampleResult.cell_id == cell.id))}
                    check.weights, check.weights_detail = _weights(stored.config, cell.config)
            finally:
                engine.dispose()
        _compare(check, stored, rows, sorted(redo))
        check.chosen = len(chosen)
    except UsageError as exc:
        check.error = str(exc)
    return check


def _outcome(sample: Mapping[str, Any]) -> tuple[int, int, int]:
    return int(sample["label"]), int(sample["clean_pred"]), int(sample["adv_pred"])


def _compare(check: CellCheck, stored: StoredCell, rows: Mapping[int, Mapping[str, Any]],
             indices: Sequence[int]) -> None:
    for index in indices:
        mine, theirs = stored.samples[index], rows.get(index)
        if theirs is None:
            raise UsageError(f"sample {index} was not recomputed")
        a, b = _outcome(mine), _outcome(theirs)
        correct = (a[1] == a[0], b[1] == b[0])
        fooled = (correct[0] and a[2] != a[0], correct[1] and b[2] != b[0])
        check.compared += 1
        check.predictions += a == b
        check.correct += correct[0] == correct[1]
        check.fooled += fooled[0] == fooled[1]
        diff = abs(float(mine["perturbation"]) - float(theirs["perturbation"]))
        check.max_perturbation_diff = max(check.max_perturbation_diff, diff)
        if a != b and len(check.disagreements) < _SHOWN:
            check.disagreements.append(SampleDiff(index, a, b))


def verify_store(db: str | None = None, *, cells: int = 2, samples: int | None = None, seed: int = 0,
                 keys: Sequence[str] = (), registry: Registry[DefenseEntry] | None = None, batch_size: int = 128,
                 allow_train: bool = True, data_root: str | None = None,
                 artifact_root: str | None = None, defenses: Sequence[str] = ()) -> list[CellCheck]:
    """Verify ``cells`` finished cells of the store ``db`` chosen at random with ``seed`` among those of
    ``defenses`` (default: all), or the cells ``keys``, each whole or ``samples`` of its samples; the store
    is only read."""
    for option, value in (("--cells", cells), ("--samples", samples), ("--batch-size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{option} must be a whole number >= 1, got {value!r}")
    engine = read_only_engine(db)
    try:
        done = done_keys(engine, defenses)
        if keys:
            missing = [k for k in keys if k not in done]
            if missing:
                raise UsageError(f"no finished cell {missing[0]!r} in the results database; valid keys: see "
                                 f"`harness show` ({len(done)} finished cells)")
            chosen = list(dict.fromkeys(keys))
        else:
            if not done and defenses:
                with Session(engine) as session:
                    stored = sorted(session.scalars(select(Cell.defense).where(Cell.status == "done").distinct()))
                raise UsageError(f"the results database holds no finished cell of {', '.join(defenses)}; valid: "
                                 f"{', '.join(stored) or 'none (it has no finished cell)'}")
            if not done:
                raise UsageError("the results database holds no finished cell to verify; run `harness run` first")
            chosen = sorted(random.Random(seed).sample(done, min(cells, len(done))))
        stored = stored_cells(engine, chosen)
    finally:
        engine.dispose()
    rng = random.Random(seed)
    threads = torch.get_num_threads()
    log.info("verifying %d cell(s) on %d torch thread(s)", len(stored), threads)
    return [recompute_cell(cell, samples=samples, rng=rng, registry=registry, batch_size=batch_size,
                           allow_train=allow_train, data_root=data_root, artifact_root=artifact_root)
            for cell in stored]

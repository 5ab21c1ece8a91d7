"""Submissions: a defense entry's cells in a bundle anyone can check, and merging bundles into a store.

``harness submit`` runs the cells a submission needs through the normal runner (the grid of ``harness
run``'s options, or every grid of a study with the submitted entry as its defense) and writes a bundle:
a folder, or the same files in a ``.tar.gz``:

* ``submission.json``: the format and its version, the entry's metadata, the plugin's distribution
  (name and version, found with :mod:`importlib.metadata` from the entry point's module), the study, the
  harness version, the cell keys, and the sha256 of each other file;
* ``cells.json``: every cell's columns (its ``config``: key fields and provenance; accuracies, metrics),
  each naming its run by the bundle's run id;
* ``runs.json``: those runs (code provenance: commit, dirtiness, harness and package versions, device);
* ``samples.csv``: every per-sample row (cell key, sample index, label, predictions, perturbation norm,
  extra as JSON).

``harness merge BUNDLE`` checks a bundle before it writes anything (:func:`validate_bundle`): the keys
recomputed from the configs, the denormalised columns against the config, every cell finished with one
sample per index of its ``n``, the accuracies recomputed from the samples, every perturbation within
eps, the provenance complete, and none of its cells already in the store; ``--verify K`` recomputes K
of its cells (:func:`harness.evaluation.verify.recompute_cell`) and rejects the bundle on a
disagreement. A bundle that passes is inserted in one transaction: runs, cells and samples, or nothing.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import importlib.metadata as metadata
import io
import json
import math
import random
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from harness import __version__
from harness.core.entry import ENTRY_POINT_GROUP, DefenseEntry, defense_registry
from harness.core.errors import UsageError
from harness.core.paths import data_root
from harness.core.registry import Registry
from harness.core.threat import Epsilon
from harness.data.disk import read_meta
from harness.evaluation.runner import KEY_FIELDS, RunRequest, cell_key, evaluation_subset, run_grid
from harness.evaluation.verify import SAMPLE_FIELDS, StoredCell, read_only_engine, recompute_cell, stored_cells
from harness.results.database import open_db
from harness.results.schema import Cell, Run, SampleResult

__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "BundleRejected", "Bundle", "MergeResult", "distribution_of",
           "submission_requests", "submit", "write_bundle", "read_bundle", "validate_bundle", "merge_bundle"]

BUNDLE_FORMAT = "harness-submission"
BUNDLE_VERSION = 1
MANIFEST, CELLS, RUNS, SAMPLES = "submission.json", "cells.json", "runs.json", "samples.csv"
SAMPLE_COLUMNS = ("cell_key", "sample_index", "label", "clean_pred", "adv_pred", "perturbation", "extra")
#: the provenance a cell's config must carry, and a run's fields
CONFIG_PROVENANCE = ("entry", "protocol_tier", "classifier_provenance", "data_source", "weights_fingerprint")
RUN_PROVENANCE = ("git_commit", "git_dirty", "harness_version", "packages", "device", "host")
#: the columns a cell repeats from its config: column -> how to read it from the config
_DENORMALISED = {
    "defense": lambda c: c["defense"]["name"], "defense_version": lambda c: c["defense"]["version"],
    "classifier": lambda c: c["classifier"], "dataset": lambda c: c["dataset"]["name"],
    "dataset_fingerprint": lambda c: c["dataset"]["fingerprint"], "variant": lambda c: c["dataset"]["variant"],
    "threat": lambda c: c["threat"]["norm"], "eps": lambda c: c["threat"]["eps"],
    "eps_text": lambda c: c["threat"]["eps_text"], "attack": lambda c: c["attack"]["name"],
    "protocol": lambda c: c["protocol"], "n": lambda c: c["n"], "seed": lambda c: c["seed"],
}
_TIMES = ("started_at", "finished_at")
#: relative and absolute slack of the perturbation check, as the runner's own guard
#: (:func:`harness.evaluation.guards.check_batch`)
EPS_RTOL, EPS_ATOL = 1e-5, 1e-6


class BundleRejected(UsageError):
    """A bundle that fails validation: one line saying what is wrong; nothing was written."""


@dataclass(frozen=True)
class Bundle:
    """A submission as read from its files: the manifest, the cells (with their samples) and the runs."""

    manifest: dict[str, Any]
    cells: list[StoredCell]
    runs: dict[int, dict[str, Any]]
    cell_runs: dict[str, int | None]  # cell key -> the bundle's id of its run


@dataclass(frozen=True)
class MergeResult:
    """What a merge inserted."""

    cells: int
    samples: int
    runs: int
    verified: list[Any] = field(default_factory=list)


# -- the entry's distribution -------------------------------------------------------------------------
def distribution_of(name: str) -> dict[str, str]:
    """``{"name", "version", "module"}`` of the distribution that installs defense ``name``: the entry
    point's module, mapped to its distribution by :func:`importlib.metadata.packages_distributions`
    (the entry point's own distribution when that module is not a top-level package of one)."""
    points = [p for p in metadata.entry_points(group=ENTRY_POINT_GROUP) if p.name == name]
    if not points:
        return {"name": "", "version": "", "module": ""}
    point = points[0]
    module = point.module
    owners = metadata.packages_distributions().get(module.split(".")[0], [])
    dist = owners[0] if owners else (point.dist.metadata["Name"] if point.dist is not None else "")
    try:
        version = metadata.version(dist) if dist else ""
    except metadata.PackageNotFoundError:
        version = ""
    return {"name": dist, "version": version, "module": module}


# -- submit ---------------------------------------------------------------------------------------------
def submission_requests(defense: str, requests: Sequence[RunRequest]) -> list[RunRequest]:
    """``requests`` (a study's grids, or the one grid of ``harness run``'s options) with ``defense`` as
    their only defense, each grid once."""
    out: list[RunRequest] = []
    for request in requests:
        mine = replace(request, defenses=(defense,))
        if mine not in out:
            out.append(mine)
    return out


def submit(defense: str, requests: Sequence[RunRequest], engine: Engine, out: str | Path, *,
           study: str | None = None, registry: Registry[DefenseEntry] | None = None) -> tuple[Path, list[Any]]:
    """Run the submission's cells (``requests``, already with ``defense`` as their defense) into ``engine``
    and write the bundle ``out`` (a folder, or a ``.tar.gz``); returns its path and the cell outcomes. A
    failed cell writes no bundle (UsageError naming it)."""
    registry = registry or defense_registry()
    entry = registry.get(defense)
    outcomes = [o for request in requests for o in run_grid(request, engine, registry)]
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise UsageError(f"{len(failed)} cell(s) failed, no bundle written: "
                         + "; ".join(f"{o.protocol} {o.attack} eps={o.eps}: {o.error}" for o in failed))
    keys = list(dict.fromkeys(o.key for o in outcomes))
    with Session(engine) as session:
        pending = [k for k in keys if session.scalar(select(Cell.status).where(Cell.key == k)) != "done"]
    if pending:
        raise UsageError(f"cell {pending[0]} is not finished (computed by another process?); submit again later")
    manifest = {"entry": entry.describe(), "distribution": distribution_of(defense), "study": study}
    return write_bundle(engine, keys, out, manifest), outcomes


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def write_bundle(engine: Engine, keys: Sequence[str], out: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write the cells ``keys`` of ``engine`` (with their samples and runs) as a bundle at ``out``."""
    out = Path(out)
    cells = stored_cells(engine, keys)
    with Session(engine) as session:
        run_ids = {c.key: session.scalar(select(Cell.run_id).where(Cell.key == c.key)) for c in cells}
        runs = []
        for run_id in sorted({r for r in run_ids.values() if r is not None}):
            run = session.get(Run, run_id)
            runs.append({attr.key: _plain(getattr(run, attr.key)) for attr in Run.__mapper__.column_attrs})
    rows = [{**{k: _plain(v) for k, v in c.columns.items()}, "run_id": run_ids[c.key]} for c in cells]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SAMPLE_COLUMNS)
    for cell in cells:
        for index, sample in sorted(cell.samples.items()):
            writer.writerow([cell.key, index, sample["label"], sample["clean_pred"], sample["adv_pred"],
                             repr(float(sample["perturbation"])),
                             "" if sample["extra"] is None else json.dumps(sample["extra"], sort_keys=True)])
    files = {CELLS: json.dumps(rows, indent=1, sort_keys=True, default=str),
             RUNS: json.dumps(runs, indent=1, sort_keys=True, default=str), SAMPLES: buffer.getvalue()}
    head = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "harness_version": __version__,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(), **manifest,
            "cells": [c.key for c in cells],
            "files": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()}}
    files = {MANIFEST: json.dumps(head, indent=1, sort_keys=True, default=str), **files}
    if out.name.endswith(".tar.gz"):
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:gz") as archive:
            for name, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                archive.addfile(info, io.BytesIO(data))
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text)
    return out


# -- reading and validating -------------------------------------------------------------------------------
def _files(path: Path) -> dict[str, str]:
    """The bundle's files by name (a folder or a .tar.gz); only the four files of the format are read."""
    names = (MANIFEST, CELLS, RUNS, SAMPLES)
    if path.is_dir():
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise BundleRejected(f"bundle {path}: missing {missing[0]}; a bundle holds {', '.join(names)}")
        return {n: (path / n).read_text() for n in names}
    if not path.is_file():
        raise BundleRejected(f"no bundle at {path}; give the folder or .tar.gz `harness submit --out` wrote")
    try:
        with tarfile.open(path, "r:*") as archive:
            found = {}
            for member in archive.getmembers():
                if member.isfile() and member.name.lstrip("./") in names:
                    found[member.name.lstrip("./")] = archive.extractfile(member).read().decode()
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise BundleRejected(f"bundle {path} is not a readable .tar.gz: {exc}") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise BundleRejected(f"bundle {path}: missing {missing[0]}; a bundle holds {', '.join(names)}")
    return found


def _number(text: str, kind: type, where: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise BundleRejected(f"{where}: {text!r} is not a {kind.__name__}") from None


def read_bundle(path: str | Path) -> Bundle:
    """Parse the bundle at ``path`` (checking its format); not yet validated. The manifest's file hashes
    record what was written, for transport; validation does not trust them (anyone can recompute them)."""
    path = Path(path)
    files = _files(path)
    try:
        manifest, cells, runs = (json.loads(files[n]) for n in (MANIFEST, CELLS, RUNS))
    except ValueError as exc:
        raise BundleRejected(f"bundle {path}: a JSON file does not parse ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleRejected(f"bundle {path}: {MANIFEST} is not a {BUNDLE_FORMAT} manifest")
    if manifest.get("format_version") != BUNDLE_VERSION:
        raise BundleRejected(f"bundle {path}: format version {manifest.get('format_version')!r}; this harness "
                             f"reads version {BUNDLE_VERSION}")
    samples: dict[str, dict[int, dict[str, Any]]] = {}
    reader = csv.DictReader(io.StringIO(files[SAMPLES]))
    if tuple(reader.fieldnames or ()) != SAMPLE_COLUMNS:
        raise BundleRejected(f"bundle {path}: {SAMPLES} must have the columns {', '.join(SAMPLE_COLUMNS)}")
    for line, row in enumerate(reader, start=2):
        where = f"{SAMPLES} line {line}"
        index = _number(row["sample_index"], int, where)
        per_cell = samples.setdefault(row["cell_key"], {})
        if index in per_cell:
            raise BundleRejected(f"cell {row['cell_key']}: sample {index} appears twice")
        per_cell[index] = {"label": _number(row["label"], int, where),
                           "clean_pred": _number(row["clean_pred"], int, where),
                           "adv_pred": _number(row["adv_pred"], int, where),
                           "perturbation": _number(row["perturbation"], float, where),
                           "extra": json.loads(row["extra"]) if row["extra"] else None}
    if not isinstance(cells, list) or not isinstance(runs, list):
        raise BundleRejected(f"bundle {path}: {CELLS} and {RUNS} must be JSON lists")
    stored, cell_runs = [], {}
    for row in cells:
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            raise BundleRejected(f"bundle {path}: every cell of {CELLS} needs a key")
        columns = {k: v for k, v in row.items() if k != "run_id"}
        for name in _TIMES:
            if isinstance(columns.get(name), str):
                columns[name] = dt.datetime.fromisoformat(columns[name])
        if row["key"] in cell_runs:
            raise BundleRejected(f"cell {row['key']} appears twice in the bundle")
        cell_runs[row["key"]] = row.get("run_id")
        stored.append(StoredCell(columns, samples.pop(row["key"], {})))
    if samples:
        raise BundleRejected(f"{SAMPLES} has samples of cell {next(iter(samples))}, which {CELLS} does not hold")
    by_id = {}
    for run in runs:
        if not isinstance(run, dict) or not isinstance(run.get("id"), int):
            raise BundleRejected(f"bundle {path}: every run of {RUNS} needs an integer id")
        by_id[run["id"]] = run
    return Bundle(manifest, stored, by_id, cell_runs)


def _check_cell(cell: StoredCell, cell_runs: Mapping[str, int | None], runs: Mapping[int, Mapping[str, Any]],
                root: str | None) -> None:
    """Raise :class:`BundleRejected` with the first thing wrong with ``cell``."""
    key, config, columns = cell.key, cell.config, cell.columns
    if not isinstance(config, dict):
        raise BundleRejected(f"cell {key}: no config")
    unknown = sorted(set(columns) - {attr.key for attr in Cell.__mapper__.column_attrs})
    if unknown:
        raise BundleRejected(f"cell {key}: unknown column {unknown[0]!r} in {CELLS}")
    try:
        recomputed = cell_key(config)
    except KeyError as exc:
        raise BundleRejected(f"cell {key}: its config lacks the key field {exc}") from None
    if recomputed != key:
        raise BundleRejected(f"cell {key}: the key does not match its config (recomputed {recomputed}): the key "
                             f"or a key field ({', '.join(KEY_FIELDS)}) was edited")
    for column, read in _DENORMALISED.items():
        try:
            expected = read(config)
        except (KeyError, TypeError):
            raise BundleRejected(f"cell {key}: its config does not say its {column}") from None
        if columns.get(column) != expected:
            raise BundleRejected(f"cell {key}: column {column} is {columns.get(column)!r} but its config says "
                                 f"{expected!r}")
    if columns.get("status") != "done":
        raise BundleRejected(f"cell {key}: status {columns.get('status')!r}; only finished (done) cells are merged")
    missing = [name for name in CONFIG_PROVENANCE if not config.get(name)]
    if missing:
        raise BundleRejected(f"cell {key}: provenance incomplete: its config lacks {', '.join(missing)}")
    run_id = cell_runs.get(key)
    if run_id not in runs:
        raise BundleRejected(f"cell {key}: provenance incomplete: its run {run_id!r} is not in {RUNS}")
    absent = [name for name in RUN_PROVENANCE if name not in runs[run_id]]
    if absent or not runs[run_id].get("harness_version"):
        raise BundleRejected(f"cell {key}: provenance incomplete: its run lacks "
                             f"{', '.join(absent) or 'harness_version'}")
    _check_samples(cell, root)


def _check_samples(cell: StoredCell, root: str | None) -> None:
    key, columns, samples = cell.key, cell.columns, cell.samples
    n = int(columns["n"])
    if len(samples) != n or columns.get("n_done") != n:
        expected = set(_subset(columns, root) or range(n))
        lacking = sorted(expected - set(samples))
        hint = f" (missing sample {lacking[0]})" if lacking else ""
        raise BundleRejected(f"cell {key}: {len(samples)} samples for n = {n} (n_done {columns.get('n_done')}){hint}")
    subset = _subset(columns, root)
    if subset is not None and set(samples) != set(subset):
        stray = sorted(set(samples) - set(subset))[0]
        raise BundleRejected(f"cell {key}: sample {stray} is not one of the cell's {n} evaluation images")
    clean_ok = [s["clean_pred"] == s["label"] for _, s in sorted(samples.items())]
    robust_ok = [ok and s["adv_pred"] == s["label"] for ok, (_, s) in zip(clean_ok, sorted(samples.items()))]
    clean, robust = sum(clean_ok) / n, sum(robust_ok) / n
    for name, value in (("clean", clean), ("robust", robust), ("avg", (clean + robust) / 2)):
        stored = columns.get(f"{name}_acc")
        if not isinstance(stored, (int, float)) or not math.isclose(stored, value, rel_tol=0, abs_tol=1e-9):
            raise BundleRejected(f"cell {key}: {name} accuracy {stored!r} does not match its samples ({value:.6f})")
    eps = float(columns["eps"])
    if not math.isclose(eps, Epsilon.parse(columns["eps_text"]).value, rel_tol=1e-9):
        raise BundleRejected(f"cell {key}: eps {eps} is not its eps_text {columns['eps_text']}")
    limit = eps * (1 + EPS_RTOL) + EPS_ATOL
    for index, sample in sorted(samples.items()):
        norm = sample["perturbation"]
        if not math.isfinite(norm) or norm < 0 or norm > limit:
            raise BundleRejected(f"cell {key}: sample {index} has perturbation {norm:.6g}, outside the "
                                 f"{columns['threat']} ball of eps {columns['eps_text']} ({eps:.6g})")


def _subset(columns: Mapping[str, Any], root: str | None) -> list[int] | None:
    """The cell's evaluation indices when its test split is here (to check the bundle holds exactly
    those); None when it is not."""
    try:
        total = int(read_meta(data_root(root), columns["dataset"])["splits"]["test"]["n"])
    except (TypeError, KeyError, ValueError, OSError):
        return None
    n = int(columns["n"])
    return evaluation_subset(total, n).tolist() if n <= total else None


def _stored_keys(db: str | None, keys: Iterable[str]) -> list[str]:
    """Which of ``keys`` the store ``db`` holds already (read only; a store that does not exist holds none)."""
    try:
        engine = read_only_engine(db)
    except UsageError:
        return []
    try:
        with Session(engine) as session:
            wanted = list(keys)
            return sorted(set(session.scalars(select(Cell.key).where(Cell.key.in_(wanted)))))
    finally:
        engine.dispose()


def validate_bundle(bundle: Bundle, db: str | None = None, *, root: str | None = None) -> None:
    """Raise :class:`BundleRejected` with the first problem of ``bundle`` (against the store ``db``)."""
    if not bundle.cells:
        raise BundleRejected("the bundle holds no cell")
    if sorted(bundle.manifest.get("cells") or []) != sorted(c.key for c in bundle.cells):
        raise BundleRejected(f"the manifest's cells do not match {CELLS}")
    distribution = bundle.manifest.get("distribution") or {}
    if not distribution.get("name") or not distribution.get("version"):
        raise BundleRejected("provenance incomplete: the manifest does not name the plugin's distribution and version")
    for cell in bundle.cells:
        _check_cell(cell, bundle.cell_runs, bundle.runs, root)
    stored = _stored_keys(db, (c.key for c in bundle.cells))
    if stored:
        raise BundleRejected(f"cell {stored[0]} is already in the results database: a merge never overwrites "
                             f"({len(stored)} of the bundle's {len(bundle.cells)} cells are stored)")


def _insert(engine: Engine, bundle: Bundle) -> tuple[int, int, int]:
    """Insert the bundle's runs, cells and samples in one transaction (nothing on any error)."""
    samples = 0
    with Session(engine) as session:
        try:
            present = session.scalar(select(Cell.key).where(Cell.key.in_([c.key for c in bundle.cells])))
            if present is not None:
                raise BundleRejected(f"cell {present} is already in the results database: a merge never overwrites")
            run_ids: dict[int, int] = {}
            for old_id, fields in sorted(bundle.runs.items()):
                values = {k: v for k, v in fields.items() if k != "id"}
                for name in _TIMES:
                    if isinstance(values.get(name), str):
                        values[name] = dt.datetime.fromisoformat(values[name])
                run = Run(**values)
                session.add(run)
                session.flush()
                run_ids[old_id] = run.id
            for stored in bundle.cells:
                cell = Cell(**stored.columns, run_id=run_ids.get(bundle.cell_runs.get(stored.key)))
                session.add(cell)
                session.flush()
                session.add_all(SampleResult(cell_id=cell.id, sample_index=index,
                                             **{name: sample[name] for name in SAMPLE_FIELDS})
                                for index, sample in sorted(stored.samples.items()))
                samples += len(stored.samples)
            session.commit()
        except IntegrityError:
            session.rollback()
            raise BundleRejected("a cell of the bundle was stored meanwhile: nothing merged") from None
        except BaseException:
            session.rollback()
            raise
    return len(bundle.cells), samples, len(bundle.runs)


def merge_bundle(path: str | Path, db: str | None = None, *, verify: int = 0, seed: int = 0,
                 registry: Registry[DefenseEntry] | None = None, batch_size: int = 128,
                 data_root: str | None = None) -> MergeResult:
    """Validate the bundle at ``path`` (and recompute ``verify`` of its cells), then insert it into the
    store ``db`` in one transaction; a bundle that fails is a :class:`BundleRejected` and nothing is
    written (a store that did not exist is not created)."""
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise UsageError(f"--verify must be a whole number >= 0, got {verify!r}")
    bundle = read_bundle(path)
    validate_bundle(bundle, db, root=data_root)
    checks = []
    if verify:
        rng = random.Random(seed)
        chosen = sorted(rng.sample(bundle.cells, min(verify, len(bundle.cells))), key=lambda c: c.key)
        for cell in chosen:
            check = recompute_cell(cell, rng=rng, registry=registry, batch_size=batch_size, data_root=data_root)
            checks.append(check)
            if not check.agrees:
                raise BundleRejected(f"--verify: {check.line()}")
    engine = open_db(db)
    try:
        cells, samples, runs = _insert(engine, bundle)
    finally:
        engine.dispose()
    return MergeResult(cells, samples, runs, checks)

"""A detail page per finished cell (``cells/<key>.html``) with its full provenance, and the cell's
per-sample results beside it (``cells/<key>.csv``), linked from the leaderboard's rows.

A page shows the cell's numbers and evaluation-quality flags, the entry's model card, the paper's
number for its tier (if any), the run that computed it (git commit and dirty flag, harness version,
host, device, command, package versions) and its stored config. Nothing on it depends on when the
report was made, and everything is sorted: the same store writes the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import numbers
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
from jinja2 import Environment

import harness
from harness.report.frame import match_reported, safe_stem
from harness.report.html import vendored_script
from harness.report.protocols import protocol_info
from harness.report.tables import FLAG_TEXT

__all__ = ["CELLS_DIR", "SAMPLE_COLUMNS", "cell_page_names", "samples_csv", "write_cell_pages"]

#: The folder (under the report's folder) of the detail pages.
CELLS_DIR = "cells"
#: The first columns of a cell's per-sample CSV; the keys of the samples' ``extra`` follow, sorted.
SAMPLE_COLUMNS = ("sample_index", "label", "clean_pred", "adv_pred", "clean_correct", "robust_correct")

log = logging.getLogger(__name__)

Sample = Sequence[Any]  # (cell key, sample index, label, clean_pred, adv_pred, extra): queries.done_samples


def _stem(key: str) -> str:
    """A file stem for a cell key: the key itself when it is already safe, else its safe form plus a
    short hash of the key (two keys never share a file)."""
    stem = safe_stem(key)
    return stem if stem == key else f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def cell_page_names(keys: Iterable[str]) -> dict[str, str]:
    """Cell key -> its detail page relative to the report folder (``cells/<stem>.html``)."""
    return {key: f"{CELLS_DIR}/{_stem(key)}.html" for key in sorted(set(map(str, keys)))}


def _plain(value: Any) -> Any:
    """A CSV field: scalars as they are, anything else as compact sorted JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return "" if value is None else value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def samples_csv(samples: Sequence[Sample]) -> tuple[str, int]:
    """The per-sample CSV text of one cell's samples (tuples as :func:`harness.results.queries.done_samples`
    gives them) and its number of data rows; rows by sample index."""
    extras = sorted({k for s in samples if isinstance(s[5], dict) for k in s[5]})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*SAMPLE_COLUMNS, *extras])
    rows = sorted(samples, key=lambda s: int(s[1]))
    for _, index, label, clean, adv, extra in rows:
        clean_ok = int(clean) == int(label)
        extra = extra if isinstance(extra, dict) else {}
        writer.writerow([int(index), int(label), int(clean), int(adv), int(clean_ok),
                         int(clean_ok and int(adv) == int(label)), *(_plain(extra.get(k)) for k in extras)])
    return buffer.getvalue(), len(rows)


def _pct(value: Any) -> str:
    return f"{100 * float(value):.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else "–"


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


def _card(entry: Mapping[str, Any]) -> list[tuple[str, str]]:
    meta = entry.get("metadata") if isinstance(entry.get("metadata"), dict) else {}
    extra = meta.get("extra_data")
    facts = [("name", entry.get("name")), ("version", entry.get("version")), ("kind", entry.get("kind")),
             ("role", entry.get("role")), ("paper", entry.get("paper")), ("citation", entry.get("citation")),
             ("stochastic", entry.get("stochastic")), ("differentiable", entry.get("differentiable")),
             ("architecture", meta.get("architecture")), ("parameters (model card)", meta.get("parameters")),
             ("extra data", json.dumps(extra, sort_keys=True) if isinstance(extra, dict) else extra),
             ("NFE per prediction", meta.get("nfe")), ("venue", meta.get("venue")), ("year", meta.get("year")),
             ("code (not a link)", meta.get("code_url"))]
    measured = entry.get("parameters")
    if isinstance(measured, dict):
        facts += [(f"parameters measured ({k})", v) for k, v in sorted(measured.items())]
    return [(k, _text(v)) for k, v in facts if v not in (None, "")]


def _run_facts(rec: Mapping[str, Any]) -> list[tuple[str, str]]:
    commit = _text(rec.get("run_git_commit")) or "unknown"
    dirty = rec.get("run_git_dirty")
    dirty = None if dirty is None or (isinstance(dirty, float) and math.isnan(dirty)) else bool(dirty)
    return [("run", _text(rec.get("run_id"))), ("git commit", commit),
            ("working tree", "dirty (uncommitted changes)" if dirty else "clean" if dirty is not None else ""),
            ("harness version", _text(rec.get("run_harness_version"))), ("host", _text(rec.get("run_host"))),
            ("device", _text(rec.get("run_device"))), ("command", _text(rec.get("run_command"))),
            ("run status", _text(rec.get("run_status"))), ("run started", _text(rec.get("run_started_at"))),
            ("run finished", _text(rec.get("run_finished_at")))]


def _cell_view(rec: Mapping[str, Any], csv_name: str, csv_rows: int,
               reported: Mapping[tuple[str, str], Any]) -> dict[str, Any]:
    config = rec["config"] if isinstance(rec.get("config"), dict) else {}
    entry = config.get("entry") if isinstance(config.get("entry"), dict) else {}
    label, desc = protocol_info(str(rec["protocol"]))
    n = int(rec["n"]) if isinstance(rec.get("n"), numbers.Integral) else None
    seconds = rec.get("seconds")
    seconds = float(seconds) if isinstance(seconds, numbers.Real) and math.isfinite(seconds) else None
    per_image = seconds / n if seconds is not None and n else None
    flags = [f for f in rec.get("flags") or [] if isinstance(f, dict)]
    stored = reported.get((str(rec["defense"]), str(rec["defense_version"])), entry.get("reported"))
    match = match_reported(stored, dataset=str(rec["dataset"]), threat=str(rec["threat"]), eps=float(rec["eps"]),
                           eps_text=str(rec["eps_text"]), protocol=str(rec["protocol"]),
                           classifier=str(rec["classifier"]), attack_label=str(rec["attack_label"]),
                           variant=str(rec["variant"]), config=config)
    results = [("clean accuracy", _pct(rec.get("clean_acc"))), ("robust accuracy (this attack)", _pct(rec.get("robust_acc"))),
               ("best-known robust accuracy", _pct(rec.get("best_known_acc"))),
               ("best-known over", ", ".join(rec.get("best_known_attacks") or [])),
               ("avg", _pct(rec.get("avg_acc"))), ("n", _text(n)), ("samples stored", _text(rec.get("n_done"))),
               ("seconds", f"{seconds:.3g}" if seconds is not None else ""),
               ("seconds per image", f"{per_image:.3g}" if per_image is not None else ""),
               ("started", _text(rec.get("started_at"))), ("finished", _text(rec.get("finished_at")))]
    setting = [("defense", rec["defense"]), ("defense version", rec["defense_version"]), ("preset", rec.get("preset")),
               ("classifier", rec.get("classifier")), ("dataset", rec["dataset"]),
               ("data fingerprint", rec.get("dataset_fingerprint")), ("data source", rec.get("data_source")),
               ("variant", rec.get("variant")), ("threat", rec["threat"]), ("eps", rec["eps_text"]),
               ("protocol", f"{rec['protocol']} ({label})"), ("attack", rec.get("attack_label")),
               ("attack parameters", rec.get("attack_params")), ("defense options", rec.get("defense_options")),
               ("seed", rec.get("seed")), ("cell key", rec["cell_key"])]
    packages = rec.get("run_packages") if isinstance(rec.get("run_packages"), dict) else {}
    return {
        "heading": f"{rec['defense']} · {rec['dataset']} · {rec['threat']} ε = {rec['eps_text']} · "
                   f"{rec['protocol']} · {rec.get('attack_label') or rec.get('attack')} · seed {rec.get('seed')}",
        "protocol_desc": desc, "numbers": [(k, v) for k, v in results if v],
        "setting": [(k, _text(v)) for k, v in setting if _text(v)],
        "flags": [{"name": str(f.get("name")), "help": FLAG_TEXT.get(str(f.get("name")), "see harness docs"),
                   "detail": json.dumps({k: v for k, v in f.items() if k != "name"}, sort_keys=True, default=str)}
                  for f in sorted(flags, key=lambda f: json.dumps(f, sort_keys=True, default=str))],
        "card": _card(entry), "run": [(k, v) for k, v in _run_facts(rec) if v],
        "packages": sorted((str(k), _text(v)) for k, v in packages.items()),
        "reported": {k: _text(v) for k, v in sorted(match.items())} if match else {},
        "config": json.dumps(config, sort_keys=True, indent=2, default=str, ensure_ascii=False),
        "csv": csv_name, "csv_rows": csv_rows,
    }


def _write(path: Path, text: str, writer: Callable[[Path, str], Path] | None) -> Path:
    if writer is not None:
        return writer(path, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")
    return path


def write_cell_pages(out_dir: Path, done: pd.DataFrame, samples: Sequence[Sample], env: Environment, *,
                     reported: Mapping[tuple[str, str], Any] | None = None,
                     writer: Callable[[Path, str], Path] | None = None) -> dict[str, str]:
    """Write ``cells/<key>.html`` and ``cells/<key>.csv`` for every finished cell in ``done`` (a done-cells
    frame with best-known accuracy and flags, :func:`harness.report.writer.with_best_known`), from its
    ``samples`` (:func:`harness.results.queries.done_samples`); remove the pages of cells no longer
    finished. ``reported`` maps (defense, version) to the installed entry's reported numbers (they win
    over those stored with the cell); ``writer(path, text)`` writes a file (default: plain write).
    Returns cell key -> page path relative to ``out_dir``, for the leaderboard's links."""
    out_dir = Path(out_dir)
    folder = out_dir / CELLS_DIR
    if done.empty:
        names: dict[str, str] = {}
    else:
        names = cell_page_names(done["cell_key"])
    by_cell: dict[str, list[Sample]] = {}
    for sample in samples:
        by_cell.setdefault(str(sample[0]), []).append(sample)
    template = env.get_template("cell.html.j2")
    written: set[Path] = set()
    records = sorted(done.to_dict("records"), key=lambda r: str(r["cell_key"])) if names else []
    for rec in records:
        page = out_dir / names[str(rec["cell_key"])]
        text, rows = samples_csv(by_cell.get(str(rec["cell_key"]), []))
        csv_path = page.with_suffix(".csv")
        written.add(_write(csv_path, text, writer).resolve())
        html = template.render(title=f"cell {rec['cell_key']}", harness_version=harness.__version__,
                               vendor_js=vendored_script(),
                               cell=_cell_view(rec, csv_path.name, rows, reported or {}))
        written.add(_write(page, html, writer).resolve())
    for old in sorted(folder.glob("*")) if folder.is_dir() else ():
        if old.suffix in (".html", ".csv") and old.resolve() not in written:
            log.info("removing stale cell page %s", old)
            old.unlink()
    log.info("wrote %d cell pages under %s", len(records), folder)
    return names

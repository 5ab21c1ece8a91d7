"""The results store as pandas DataFrames: one row per cell (with its run's provenance), and the
finished cells aggregated over seeds.

Accuracies stay fractions in ``[0, 1]`` here; the renderers turn them into percent. Also the shared
vocabulary of the renderers: data-source labels, safe file stems, which defenses are baselines.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from fractions import Fraction
from typing import Any, Iterable, Mapping

import pandas as pd
from sqlalchemy.engine import Engine

from harness.core.entry import Role
from harness.results.queries import cells_with_runs
from harness.results.schema import Cell, Run

__all__ = ["CELL_COLUMNS", "SEED_GROUP_KEYS", "NON_KEY_CONFIG", "data_label", "safe_stem", "cells_frame",
           "done_cells", "results_time", "results_stamp", "baseline_defenses", "aggregate_seeds", "match_reported",
           "canonical_json"]

log = logging.getLogger(__name__)

_CELL_FIELDS = ("run_id", "defense", "defense_version", "preset", "classifier", "dataset",
                "dataset_fingerprint", "data_source", "variant", "threat", "eps", "eps_text", "attack",
                "attack_label", "protocol", "n", "seed", "status", "n_done", "clean_acc", "robust_acc",
                "avg_acc", "seconds", "error", "started_at", "finished_at")
_RUN_FIELDS = ("git_commit", "git_dirty", "harness_version", "device", "host", "started_at",
               "finished_at", "status", "command", "packages")
_ENTRY_FIELDS = ("name", "version", "kind", "role", "paper", "citation", "stochastic", "differentiable")

#: Columns of :func:`cells_frame` (``metric_<name>`` columns follow, one per numeric metric).
CELL_COLUMNS: tuple[str, ...] = (
    ("cell_id", "cell_key") + _CELL_FIELDS + ("attack_params", "defense_options", "setting", "metrics",
                                              "config")
    + tuple(f"entry_{f}" for f in _ENTRY_FIELDS) + tuple(f"run_{f}" for f in _RUN_FIELDS))

#: Cells that differ only in ``seed`` (and provenance) are aggregated into one row. ``setting`` is the
#: cell's config without the seed and without metadata (:data:`NON_KEY_CONFIG`), so cells run with
#: other defense options or train seeds are never averaged together.
SEED_GROUP_KEYS: tuple[str, ...] = (
    "defense", "defense_version", "preset", "classifier", "dataset", "dataset_fingerprint",
    "data_source", "variant", "threat", "eps", "eps_text", "attack", "attack_label", "attack_params",
    "defense_options", "protocol", "n", "setting")

#: Config keys that describe a cell rather than define it (left out of ``setting``).
NON_KEY_CONFIG = ("seed", "entry", "protocol_tier", "protocol_note", "classifier_provenance", "data_source",
                  "defense_provenance")


def results_time(cells: pd.DataFrame) -> dt.datetime | None:
    """When the store's results last changed: the latest ``finished_at`` of its cells (UTC), or None for
    a store with no finished cell. Reports show this instead of the wall clock, so the same store always
    renders the same bytes (the committed leaderboard is checked against a fresh render)."""
    if cells.empty or "finished_at" not in cells:
        return None
    stamps = pd.to_datetime(cells["finished_at"], utc=True).dropna()
    return None if stamps.empty else stamps.max().to_pydatetime()


def results_stamp(cells: pd.DataFrame, when: dt.datetime | None = None) -> str:
    """``when`` (default :func:`results_time`) as the reports print it: ``YYYY-MM-DD HH:MM:SS UTC``."""
    when = when or results_time(cells)
    return "no results yet" if when is None else when.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def data_label(source: str) -> str:
    """A short label for a data source; results on a JPEG copy of a test set are labelled as such."""
    return "JPEG copy" if re.search(r"jpe?g", source or "", re.IGNORECASE) else (source or "")


def safe_stem(*parts: Any) -> str:
    """A filename stem from ``parts``: ``("cifar10", "linf", "8/255")`` -> ``cifar10_linf_8-255``."""
    cleaned = [re.sub(r"[^A-Za-z0-9.+-]+", "-", str(p).replace("/", "-")).strip("-.") or "x"
               for p in parts]
    return "_".join(cleaned)


def canonical_json(value: Any) -> str:
    """``value`` as compact JSON with sorted keys (``""`` for ``None``)."""
    if value is None:
        return ""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _attack_params(config: Mapping[str, Any]) -> str:
    """The attack's parameters from a cell config (``config["attack"]`` or ``["attack_params"]``)."""
    for name in ("attack", "attack_params"):
        params = config.get(name)
        if isinstance(params, Mapping):
            return canonical_json({k: v for k, v in params.items() if k != "seed"})
    return ""


def _defense_options(config: Mapping[str, Any]) -> str:
    """Non-default defense options, a train seed other than 0 and (for a transferred purifier) its
    training dataset (``config["defense"]``), as JSON; ``""`` if none."""
    defense = config.get("defense")
    if not isinstance(defense, Mapping):
        return ""
    picked = {k: defense[k] for k in ("options", "train_seed", "train_dataset")
              if defense.get(k) not in (None, {}, "") and not (k == "train_seed" and defense[k] == 0)}
    return canonical_json(picked) if picked else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell_record(cell: Cell, run: Run | None) -> dict[str, Any]:
    config = cell.config if isinstance(cell.config, dict) else {}
    entry = config.get("entry") if isinstance(config.get("entry"), dict) else {}
    metrics = cell.metrics if isinstance(cell.metrics, dict) else {}
    record: dict[str, Any] = {"cell_id": cell.id, "cell_key": cell.key}
    record.update({f: getattr(cell, f) for f in _CELL_FIELDS})
    setting = {k: v for k, v in config.items() if k not in NON_KEY_CONFIG}
    record.update(attack_params=_attack_params(config), defense_options=_defense_options(config),
                  setting=canonical_json(setting), metrics=metrics, config=config)
    record.update({f"entry_{f}": entry.get(f) for f in _ENTRY_FIELDS})
    record.update({f"run_{f}": getattr(run, f) if run is not None else None for f in _RUN_FIELDS})
    for name, value in metrics.items():
        if _is_number(value):
            record[f"metric_{name}"] = float(value)
    return record


def cells_frame(engine: Engine) -> pd.DataFrame:
    """Every cell in the store (any status), joined with its run's provenance.

    Columns are :data:`CELL_COLUMNS` plus ``metric_<name>`` for each numeric metric. ``metrics`` and
    ``config`` hold the stored dicts; ``entry_*`` are read from ``config["entry"]``.
    """
    records = [_cell_record(cell, run) for cell, run in cells_with_runs(engine)]
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=list(CELL_COLUMNS))
    metric_cols = sorted(c for c in frame.columns if c.startswith("metric_"))
    frame = frame[list(CELL_COLUMNS) + metric_cols]
    log.debug("loaded %d cells", len(frame))
    return frame


def done_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """Only the finished cells (``status == "done"``)."""
    return frame[frame["status"] == "done"].copy()


def baseline_defenses(cells: pd.DataFrame,
                      installed: Mapping[tuple[str, str], Mapping[str, Any]] | None = None) -> set[str]:
    """The defenses whose role is ``baseline``: as stored with their cells, or, for cells stored
    without a role (harness 0.1), as the installed entry of the same name and version declares it
    (``installed`` as :func:`harness.report.writer.installed_entries` gives it)."""
    installed = installed or {}
    names = set()
    for name, version, role in zip(cells["defense"], cells["defense_version"], cells["entry_role"]):
        if not isinstance(role, str) or not role:  # None, or NaN in a frame without any role
            role = (installed.get((name, version)) or {}).get("role")
        if role == Role.BASELINE.value:
            names.add(name)
    return names


def _mean_std(values: Iterable[Any]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; ``None`` with fewer than two values)."""
    nums = [float(v) for v in values if v is not None and _is_number(v) and not math.isnan(v)]
    if not nums:
        return None, None
    mean = sum(nums) / len(nums)
    if len(nums) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in nums) / (len(nums) - 1))


def _provenance(row: Mapping[str, Any]) -> dict[str, Any]:
    started = row.get("run_started_at") or row.get("started_at")
    return {
        "cell_key": row.get("cell_key") or "", "seed": row.get("seed"), "preset": row.get("preset") or "",
        "classifier": row.get("classifier") or "", "data_source": row.get("data_source") or "",
        "fingerprint": row.get("dataset_fingerprint") or "",
        "git_commit": row.get("run_git_commit") or "", "git_dirty": bool(row.get("run_git_dirty")),
        "harness_version": row.get("run_harness_version") or "", "device": row.get("run_device") or "",
        "run_date": pd.Timestamp(started).strftime("%Y-%m-%d %H:%M UTC") if started is not None
        and not pd.isna(started) else "",
        "seconds": row.get("seconds"), "attack_params": row.get("attack_params") or "",
    }


def _eps_value(text: Any) -> float | None:
    try:
        raw = str(text).strip()
        return float(Fraction(raw)) if "/" in raw else float(raw)
    except (ValueError, ZeroDivisionError):
        return None


def _norm(text: Any) -> str:
    return "".join(ch for ch in str(text or "").lower() if ch.isalnum())


def match_reported(reported: Any, *, dataset: str, threat: str, eps: float, eps_text: str, protocol: str,
                   classifier: str = "", attack_label: str = "", variant: str = "clean",
                   config: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The entry's reported number for this cell's dataset/threat/eps, protocol and variant, or ``None``.

    A reported number (:meth:`harness.core.entry.Reported.describe`) matches only cells of the
    protocol it names as its ``tier``; one without a tier (stored by harness 0.1) matches none. It
    matches only cells of its ``variant`` (numbers stored before variants were named are ``clean``
    ones), and never a purifier trained on another dataset (``config``'s ``defense.train_dataset``):
    papers report in-domain numbers.

    Reported eps is text (``"8/255"``); it matches the cell's text or, within 0.5 %, its value (papers
    round ``8/255`` to ``0.031``-ish decimals). Among several matches, one whose classifier and then
    attack resemble the cell's wins; ties go to the first listed.
    """
    if not isinstance(reported, (list, tuple)):
        return None
    defense_config = (config or {}).get("defense")
    if isinstance(defense_config, Mapping) and defense_config.get("train_dataset"):
        return None
    best, best_score = None, -1
    for item in reported:
        if not isinstance(item, Mapping):
            continue
        if _norm(item.get("dataset")) != _norm(dataset) or _norm(item.get("threat")) != _norm(threat):
            continue
        value = _eps_value(item.get("eps"))
        if str(item.get("eps", "")).strip() != eps_text and (
                value is None or not math.isclose(value, eps, rel_tol=5e-3)):
            continue
        if item.get("tier") != protocol or item.get("variant", "clean") != variant:
            continue
        score = 2 * (bool(item.get("classifier")) and _norm(item.get("classifier")) == _norm(classifier))
        score += _norm(item.get("attack")) == _norm(attack_label)
        if score > best_score:
            best, best_score = dict(item), score
    return best


def aggregate_seeds(done: pd.DataFrame,
                    current_reported: Mapping[tuple[str, str], Any] | None = None) -> pd.DataFrame:
    """Finished cells grouped over seeds: one row per :data:`SEED_GROUP_KEYS` combination.

    Adds ``seeds`` (count), ``seed_list``, ``{clean,robust,avg,best}_{mean,std}`` (fractions; std is the
    sample std over seeds, ``None`` for one seed; ``best`` is the best-known robust accuracy when ``done``
    has ``best_known_acc``, with the attacks it is the worst case over in ``best_attacks``), ``flags``
    (the names of the evaluation-quality flags of any of its cells, when ``done`` has ``flags``), ``metric_stats`` ({name: (mean, std)}),
    ``provenance`` (a list of dicts, one per cell), ``entry`` (``config["entry"]`` of the newest cell),
    ``protocol_note`` (its ``config["protocol_note"]``: which other protocols the cell answers, for an
    entry without a purifier), ``own_network`` (whether ``classifier`` is the entry's own network
    rather than the run's base classifier) and ``reported`` (see :func:`match_reported`).
    ``current_reported`` maps (defense, version) of installed entries to their reported numbers, which
    take precedence over those stored with the cells (so a corrected citation, or the tier that numbers
    stored by harness 0.1 lack, shows without recomputing anything).
    """
    columns = list(SEED_GROUP_KEYS) + [
        "seeds", "seed_list", "clean_mean", "clean_std", "robust_mean", "robust_std", "avg_mean",
        "avg_std", "best_mean", "best_std", "best_attacks", "flags", "metric_stats", "provenance", "entry", "protocol_note", "own_network", "reported"]
    if done.empty:
        return pd.DataFrame(columns=columns)
    metric_cols = [c for c in done.columns if c.startswith("metric_")]
    out = []
    for keys, group in done.groupby(list(SEED_GROUP_KEYS), dropna=False, sort=False):
        group = group.sort_values(["seed", "cell_id"])
        row: dict[str, Any] = dict(zip(SEED_GROUP_KEYS, keys))
        row["seeds"] = len(group)
        row["seed_list"] = [int(s) for s in group["seed"]]
        for name, col in (("clean", "clean_acc"), ("robust", "robust_acc"), ("avg", "avg_acc"),
                          ("best", "best_known_acc")):
            values = group[col].tolist() if col in group else []
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(values) if values else (None, None)
        row["best_attacks"] = sorted({a for attacks in group.get("best_known_attacks", []) for a in attacks})
        row["flags"] = sorted({f["name"] for flags in group.get("flags", []) for f in flags})
        row["metric_stats"] = {c[len("metric_"):]: _mean_std(group[c].tolist()) for c in metric_cols
                               if group[c].notna().any()}
        records = group.to_dict("records")
        row["provenance"] = [_provenance(r) for r in records]
        newest = max(records, key=lambda r: r["cell_id"])
        config = newest["config"] if isinstance(newest["config"], dict) else {}
        row["entry"] = config["entry"] if isinstance(config.get("entry"), dict) else {}
        row["protocol_note"] = str(config.get("protocol_note") or "")
        provenance = config.get("classifier_provenance")
        row["own_network"] = isinstance(provenance, dict) and provenance.get("source") == "entry"
        reported = (current_reported or {}).get((row["defense"], row["defense_version"]),
                                                row["entry"].get("reported"))
        row["reported"] = match_reported(
            reported, dataset=row["dataset"], threat=row["threat"],
            eps=float(row["eps"]), eps_text=row["eps_text"], classifier=row["classifier"],
            attack_label=row["attack_label"], protocol=row["protocol"], variant=row["variant"], config=config)
        out.append(row)
    return pd.DataFrame(out, columns=columns)

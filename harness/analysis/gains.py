"""Robust gain under fixed vs fresh randomness, and its correlation with the compression rate
(Liu & Wei, arXiv 2505.22839, findings (c) and (d)), as numbers; :mod:`harness.report.randomness`
renders them.

``gain = robust accuracy of the defense - robust accuracy of the baseline`` (the entries whose role is
``baseline``, e.g. the undefended classifier) on the same dataset, classifier, threat model and eps.
Per protocol the strongest attack counts (lowest seed-averaged robust accuracy). Analysis records
(:func:`harness.analysis.fixed_randomness.analyse`) are rows of the results DB
(:class:`harness.results.schema.Analysis`, kind ``fixed-randomness``), one per setting (defense,
version, preset, options, dataset, classifier, data fingerprint).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from harness.core.entry import Kind
from harness.core.threat import Epsilon
from harness.evaluation.protocols import AdaptiveFixed, protocol_registry
from harness.results.queries import eot_sample_extras, load_analyses, save_analysis

__all__ = ["PROTOCOL_COLUMNS", "SETTING_COLUMNS", "ANALYSIS_KIND", "ScatterPoint", "gain_table",
           "worst_of_n_accuracy", "save_record", "load_records", "random_compression", "scatter_points", "pearson_r"]

ANALYSIS_KIND = "fixed-randomness"

PROTOCOL_COLUMNS = {"non-adaptive": "non_adaptive", "bpda": "bpda", "adaptive": "fixed", "adaptive-eot": "fresh"}
_GROUP = ["dataset", "classifier", "threat", "eps_text"]
#: The columns that name one defense setting in :func:`gain_table`.
SETTING_COLUMNS = _GROUP + ["defense", "preset", "defense_options"]


def worst_of_n_accuracy(engine: Engine) -> dict[str, float]:
    """Cell key -> worst-of-N robust accuracy of ``adaptive-eot`` cells whose samples carry the
    protocol's ``extra`` (a sample counts if clean-correct and correct on all N fresh re-draws)."""
    rows = eot_sample_extras(engine, "adaptive-eot")
    tally: dict[str, list[int]] = {}
    for key, label, clean, extra in rows:
        if not extra or "worst_of" not in extra:
            continue
        ok = clean == label and extra["adv_correct_draws"] == extra["worst_of"]
        tally.setdefault(key, []).append(int(ok))
    return {key: sum(v) / len(v) for key, v in tally.items()}


def gain_table(cells: pd.DataFrame, baselines: Collection[str],
               worst_of_n: Mapping[str, float] | None = None) -> pd.DataFrame:
    """One row per defense setting (on the clean test data) other than the ``baselines`` (defense
    names): robust accuracy per protocol, the baseline (the lowest robust accuracy of a baseline in
    the same dataset / classifier / threat / eps) and the gains under fixed (``adaptive``) and fresh
    (``adaptive-eot``) randomness, in [0, 1]; with ``worst_of_n`` (from :func:`worst_of_n_accuracy`)
    also ``fresh_worst``, fresh randomness judged worst-of-N.

    ``cells`` is a cells frame (:func:`harness.report.frame.cells_frame`). An entry without a purifier
    (``entry_kind`` other than ``purifier``) is one function under every protocol that differs from
    ``adaptive`` only in the purifier: its ``adaptive`` number fills those columns where it has no
    cell of its own, and ``no_purifier`` marks its rows.
    """
    done = cells[(cells["status"] == "done") & cells["protocol"].isin(list(PROTOCOL_COLUMNS))
                 & (cells["variant"] == "clean")]
    if done.empty:
        return pd.DataFrame()
    done = done.fillna({"preset": "", "defense_options": ""})
    no_purifier = set(done.loc[done["entry_kind"] != Kind.PURIFIER.value, "defense"])
    if worst_of_n:
        worst = done[done["cell_key"].isin(list(worst_of_n))].assign(protocol="worst")
        done = pd.concat([done, worst.assign(robust_acc=worst["cell_key"].map(worst_of_n))])
    per_attack = done.groupby(SETTING_COLUMNS + ["protocol", "attack_label"], dropna=False)["robust_acc"].mean()
    strongest = per_attack.groupby(level=list(range(len(SETTING_COLUMNS) + 1))).min().unstack("protocol")
    strongest = strongest.rename(columns=dict(PROTOCOL_COLUMNS, worst="fresh_worst")).reset_index()
    strongest = strongest.reindex(columns=[*strongest.columns, *(c for c in PROTOCOL_COLUMNS.values()
                                                                 if c not in strongest)])
    strongest["no_purifier"] = strongest["defense"].isin(no_purifier)
    adaptive = strongest[PROTOCOL_COLUMNS[AdaptiveFixed.name]]
    for name in _answered_by_adaptive():
        col = PROTOCOL_COLUMNS[name]
        strongest[col] = strongest[col].mask(strongest["no_purifier"] & strongest[col].isna(), adaptive)
    is_base = strongest["defense"].isin(set(baselines))
    base_acc = strongest[is_base].groupby(_GROUP)[list(PROTOCOL_COLUMNS.values())].min().min(axis=1)
    table = strongest[~is_base].copy()
    table["baseline"] = [base_acc.get(tuple(row[_GROUP]), math.nan) for _, row in table.iterrows()]
    table["gain_fixed"] = table["fixed"] - table["baseline"]
    table["gain_fresh"] = table["fresh"] - table["baseline"]
    return table.reset_index(drop=True)


def _answered_by_adaptive() -> list[str]:
    """The protocols of :data:`PROTOCOL_COLUMNS` that an entry without a purifier answers with its
    ``adaptive`` cell (:func:`harness.evaluation.protocols.protocol_for`)."""
    registry = protocol_registry()
    return [name for name in PROTOCOL_COLUMNS if name in registry and registry.get(name).purifier_only]


def _options_of(defense_options: str) -> dict[str, Any]:
    """The ``--option`` values inside a cells-frame ``defense_options`` string (JSON or empty)."""
    return dict(json.loads(defense_options).get("options") or {}) if defense_options else {}


def save_record(engine: Engine, meta: Mapping[str, Any], record: Mapping[str, Any],
                run_id: int | None = None) -> str:
    """Store an analysis ``record`` in the results DB for the setting ``meta`` (which must hold
    ``defense``, ``preset``, ``options`` (the ``--option`` dict) and ``dataset``); the same ``meta``
    again replaces it; ``run_id`` names the :class:`harness.results.schema.Run` holding its provenance. Returns
    the record's key."""
    with Session(engine) as session:
        return save_analysis(session, ANALYSIS_KIND, meta, record, run_id).key


def load_records(engine: Engine) -> list[dict[str, Any]]:
    """Every stored fixed-randomness record as ``{"meta", "record", "key", "created_at"}``."""
    with Session(engine) as session:
        return [{"meta": row.config, "record": row.result, "key": row.key, "created_at": row.created_at}
                for row in load_analyses(session, ANALYSIS_KIND)]


@dataclass(frozen=True)
class ScatterPoint:
    """One defense setting of the compression scatter: its compression rate and robust gain."""

    label: str
    compression: float
    gain: float


def random_compression(record: Mapping[str, Any], norm: str, radius: float) -> float | None:
    """The compression rate of random ``norm`` perturbations at ``radius`` in an analysis ``record``
    (``None`` where that radius was not measured)."""
    return next((c["compression"] for c in record.get("compression") or ()
                 if c["kind"] == "random" and c["norm"] == norm and math.isclose(c["radius"], radius)), None)


def scatter_points(table: pd.DataFrame, records: Sequence[Mapping[str, Any]], *, norm: str = "linf",
                   eps_text: str = "8/255", gain: str = "gain_fixed") -> list[ScatterPoint]:
    """Join analysis records with the ``table`` rows of attack budget ``eps_text``: the compression rate
    of random ``norm`` perturbations at radius eps against the robust gain at that eps."""
    radius = Epsilon.parse(eps_text).value
    table = table[table["eps_text"] == eps_text]
    points = []
    for item in records:
        meta = item["meta"]
        rate = random_compression(item["record"], norm, radius)
        options = dict(meta.get("options") or {})
        same = [(row["defense"], row["dataset"], row["preset"]) == (meta["defense"], meta["dataset"], meta["preset"])
                and _options_of(row["defense_options"]) == options for _, row in table.iterrows()]
        rows = table[same]
        if rate is not None and not rows.empty and not pd.isna(rows[gain].iloc[0]):
            label = meta["defense"] + "".join(f" {k}={v}" for k, v in sorted(options.items()))
            points.append(ScatterPoint(label, float(rate), float(rows[gain].iloc[0])))
    return points


def pearson_r(points: Sequence[ScatterPoint]) -> float:
    """Pearson's r of compression rate vs gain (NaN with fewer than two points or no variance)."""
    xs = np.array([p.compression for p in points], dtype=float)
    ys = np.array([p.gain for p in points], dtype=float)
    if len(points) < 2 or xs.std() == 0 or ys.std() == 0:
        return math.nan
    return float(np.corrcoef(xs, ys)[0, 1])

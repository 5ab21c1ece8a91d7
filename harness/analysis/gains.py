"""Robust gain under fixed vs fresh randomness, and its correlation with the compression rate
(Liu & Wei, arXiv 2505.22839, findings (c) and (d)), as tables, a scatter plot and report sections.

``gain = robust accuracy of the defense - robust accuracy of the undefended classifier`` (defense
``none``) on the same dataset, classifier, threat model and eps. Per protocol the strongest attack
counts (lowest seed-averaged robust accuracy). Analysis records (:func:`harness.analysis.fixed_randomness.analyse`)
are rows of the results DB (:class:`harness.results.schema.Analysis`, kind ``fixed-randomness``), one per
setting (defense, version, preset, options, dataset, classifier, data fingerprint).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from markupsafe import Markup  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from harness.report.frame import safe_stem  # noqa: E402
from harness.results.queries import eot_sample_extras, load_analyses, save_analysis  # noqa: E402
from harness.core.threat import Epsilon  # noqa: E402

__all__ = ["PROTOCOL_COLUMNS", "ANALYSIS_KIND", "ScatterPoint", "gain_table", "worst_of_n_accuracy", "save_record",
           "load_records", "scatter_points", "compression_scatter", "report_sections"]

ANALYSIS_KIND = "fixed-randomness"

PROTOCOL_COLUMNS = {"non-adaptive": "non_adaptive", "bpda": "bpda", "adaptive": "fixed", "adaptive-eot": "fresh"}
_GROUP = ["dataset", "classifier", "threat", "eps_text"]
_SETTING = _GROUP + ["defense", "preset", "defense_options"]


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


def gain_table(cells: pd.DataFrame, baseline: str = "none",
               worst_of_n: Mapping[str, float] | None = None) -> pd.DataFrame:
    """One row per defense setting (on the clean test data): robust accuracy per protocol, the baseline, and the gains under
    fixed (``adaptive``) and fresh (``adaptive-eot``) randomness, in [0, 1]; with ``worst_of_n``
    (from :func:`worst_of_n_accuracy`) also ``fresh_worst``, fresh randomness judged worst-of-N."""
    done = cells[(cells["status"] == "done") & cells["protocol"].isin(list(PROTOCOL_COLUMNS))
                 & (cells["variant"] == "clean")]
    if done.empty:
        return pd.DataFrame()
    done = done.fillna({"preset": "", "defense_options": ""})
    if worst_of_n:
        worst = done[done["cell_key"].isin(list(worst_of_n))].assign(protocol="worst")
        done = pd.concat([done, worst.assign(robust_acc=worst["cell_key"].map(worst_of_n))])
    per_attack = done.groupby(_SETTING + ["protocol", "attack_label"], dropna=False)["robust_acc"].mean()
    strongest = per_attack.groupby(level=list(range(len(_SETTING) + 1))).min().unstack("protocol")
    strongest = strongest.rename(columns=dict(PROTOCOL_COLUMNS, worst="fresh_worst")).reset_index()
    base = strongest[strongest["defense"] == baseline]
    base_acc = base.set_index(_GROUP)[[c for c in PROTOCOL_COLUMNS.values() if c in base]].min(axis=1)
    table = strongest[strongest["defense"] != baseline].copy()
    table["baseline"] = [base_acc.get(tuple(row[_GROUP]), math.nan) for _, row in table.iterrows()]
    for col in PROTOCOL_COLUMNS.values():
        if col not in table:
            table[col] = math.nan
    table["gain_fixed"] = table["fixed"] - table["baseline"]
    table["gain_fresh"] = table["fresh"] - table["baseline"]
    return table.reset_index(drop=True)


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
    label: str
    compression: float
    gain: float


def scatter_points(table: pd.DataFrame, records: Sequence[Mapping[str, Any]], *, norm: str = "linf",
                   eps_text: str = "8/255", gain: str = "gain_fixed") -> list[ScatterPoint]:
    """Join analysis records with the ``table`` rows of attack budget ``eps_text``: the compression rate
    of random ``norm`` perturbations at radius eps against the robust gain at that eps."""
    radius = Epsilon.parse(eps_text).value
    table = table[table["eps_text"] == eps_text]
    points = []
    for item in records:
        meta = item["meta"]
        rates = [c["compression"] for c in item["record"]["compression"]
                 if c["kind"] == "random" and c["norm"] == norm and math.isclose(c["radius"], radius)]
        options = dict(meta.get("options") or {})
        same = [(row["defense"], row["dataset"], row["preset"]) == (meta["defense"], meta["dataset"], meta["preset"])
                and _options_of(row["defense_options"]) == options for _, row in table.iterrows()]
        rows = table[same]
        if rates and not rows.empty and not pd.isna(rows[gain].iloc[0]):
            label = meta["defense"] + "".join(f" {k}={v}" for k, v in sorted(options.items()))
            points.append(ScatterPoint(label, float(rates[0]), float(rows[gain].iloc[0])))
    return points


def compression_scatter(points: Sequence[ScatterPoint], path: str | Path,
                        ylabel: str = "robust gain, fixed randomness") -> tuple[Path, float]:
    """Scatter of compression rate vs robust gain; returns the PNG path and Pearson's r (NaN with
    fewer than two points or no variance)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    xs = np.array([p.compression for p in points], dtype=float)
    ys = np.array([p.gain for p in points], dtype=float)
    r = float(np.corrcoef(xs, ys)[0, 1]) if len(points) > 1 and xs.std() > 0 and ys.std() > 0 else math.nan
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(xs, 100 * ys)
    for p in points:
        ax.annotate(p.label, (p.compression, 100 * p.gain), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("compression rate 1 - kappa")
    ax.set_ylabel(f"{ylabel} (points)")
    ax.set_title(f"Pearson r = {r:.3f}" if not math.isnan(r) else "Pearson r: n/a")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, r


def report_sections(table: pd.DataFrame, records: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list:
    """:class:`harness.report.ExtraSection` s for the HTML report: the fixed-vs-fresh table and the
    compression scatter (written to ``out_dir/figures``)."""
    from harness.report.html import ExtraSection

    if table.empty:
        return []
    extra = ["fresh_worst"] if "fresh_worst" in table else []
    shown = table[_SETTING + list(PROTOCOL_COLUMNS.values()) + extra + ["baseline", "gain_fixed", "gain_fresh"]]
    shown = shown.rename_axis(columns=None)  # no stray "protocol" header from the pivot
    html = Markup(shown.to_html(index=False, escape=True, float_format=lambda v: f"{100 * v:.2f}",
                                na_rep="–", classes="board", border=0))
    sections = [ExtraSection(
        title="Robust gain under fixed vs fresh randomness",
        html=html,
        text="Robust accuracy (%) per protocol: non-adaptive; BPDA; adaptive with fixed per-sample randomness "
             "and exact gradients (fixed); adaptive EOT with fresh randomness (fresh; fresh_worst: correct on all "
             "N re-draws). Gain = defense minus the "
             "undefended classifier (Liu & Wei, arXiv 2505.22839).")]
    for eps_text in sorted(set(table["eps_text"]), key=lambda e: Epsilon.parse(e).value):
        points = scatter_points(table, records, eps_text=eps_text)
        if not points:
            continue
        name = f"compression_vs_gain_{safe_stem(eps_text)}.png"
        path, r = compression_scatter(points, Path(out_dir) / "figures" / name)
        sections.append(ExtraSection(
            title=f"Compression rate vs robust gain (fixed randomness, eps {eps_text})",
            text=f"l_inf compression of random perturbations at radius {eps_text} with the purifier's noise "
                 f"fixed, against the robust gain under the adaptive fixed-randomness attack at the same eps; "
                 f"Pearson r = {r:.3f} over {len(points)} settings.",
            images=(str(path.relative_to(Path(out_dir))),),
            caption="Each point is one defense setting."))
    return sections

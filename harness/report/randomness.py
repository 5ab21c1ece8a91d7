"""The fixed-randomness study in the report (Liu & Wei, arXiv 2505.22839, findings (c) and (d)): the
fixed-vs-fresh gain table and the compression-vs-gain scatter, from the numbers of
:mod:`harness.analysis.gains`, and the analyses themselves (findings (a)-(c): distances to the clean image,
spread across seeds vs inputs, compression rates), one row per analysed setting and norm."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import pandas as pd
from sqlalchemy.engine import Engine

from harness.analysis.gains import (PROTOCOL_COLUMNS, SETTING_COLUMNS, ScatterPoint, gain_table, load_records,
                                    pearson_r, random_compression, scatter_points, worst_of_n_accuracy)
from harness.core.threat import Epsilon
from harness.report.figures import plt, save_figure
from harness.report.frame import safe_stem
from harness.report.html import ExtraSection, frame_html

__all__ = ["analysis_table", "compression_scatter", "report_sections", "randomness_sections"]


def compression_scatter(points: Sequence[ScatterPoint], path: str | Path,
                        ylabel: str = "robust gain, fixed randomness") -> tuple[Path, float]:
    """Scatter of compression rate vs robust gain; returns the PNG path and Pearson's r
    (:func:`harness.analysis.gains.pearson_r`)."""
    r = pearson_r(points)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([p.compression for p in points], [100 * p.gain for p in points])
    for p in points:
        ax.annotate(p.label, (p.compression, 100 * p.gain), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("compression rate 1 - kappa")
    ax.set_ylabel(f"{ylabel} (points)")
    ax.set_title(f"Pearson r = {r:.3f}" if not math.isnan(r) else "Pearson r: n/a")
    return save_figure(fig, Path(path), dpi=120), r


def _gain_text(table: pd.DataFrame) -> str:
    text = ("Robust accuracy (%) per protocol: non-adaptive; BPDA; adaptive with fixed per-sample randomness "
            "and exact gradients (fixed); adaptive EOT with fresh randomness (fresh; fresh_worst: correct on all "
            "N re-draws). Gain = defense minus the baseline (the weakest baseline entry, e.g. the undefended "
            "classifier, on the same classifier; Liu & Wei, arXiv 2505.22839).")
    same = sorted(set(table.loc[table["no_purifier"], "defense"]))
    if same:
        text += (f" No purifier, same function: {', '.join(same)} attacked once under adaptive; that number "
                 f"also stands in the protocols that differ from it only in the purifier.")
    return text


ANALYSIS_TEXT = ("harness analyse fixed-randomness, per analysed setting and norm (Liu & Wei, arXiv 2505.22839), "
                 "with the purifier's noise fixed. Distances (means over the n images): adversarial = |x_adv - x|, "
                 "purified adv. = |P(x_adv) - x|, purified clean = |P(x) - x|; farther: purified adv. > adversarial, "
                 "purification moves the images away from the clean ones (finding (a)). Spread: mean pairwise "
                 "distance between the purifications of one input under different noise seeds, and under one seed "
                 "between those of inputs in one image's eps-ball (the image and random perturbations of it), and "
                 "their ratio (finding (b)). Compression: 1 - kappa, kappa = |P(x + d) - P(x)| / |d|, for random d at "
                 "radius eps and for the adversarial d (finding (c)).")


def _by_norm(items: Any, norm: str) -> Mapping[str, Any]:
    return next((i for i in items or () if isinstance(i, Mapping) and i.get("norm") == norm), {})


def analysis_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (analysis record, norm): the distances, the spread and the compression rates (random at
    the record's eps, and adversarial) of :func:`harness.analysis.gains.load_records`' ``records``."""
    rows = []
    for item in records:
        meta, record = item["meta"], item["record"]
        radius = Epsilon.parse(str(record.get("eps") or "8/255")).value
        norms = sorted({str(c.get("norm")) for key in ("distances", "spread", "compression")
                        for c in record.get(key) or () if isinstance(c, Mapping)})
        options = ",".join(f"{k}={v}" for k, v in sorted((meta.get("options") or {}).items()))
        for norm in norms:
            distance, spread = _by_norm(record.get("distances"), norm), _by_norm(record.get("spread"), norm)
            adversarial = next((c["compression"] for c in record.get("compression") or ()
                                if c["norm"] == norm and c["kind"] == "adversarial"), None)
            farther = distance.get("farther")
            rows.append({"defense": meta.get("defense"), "preset": meta.get("preset"), "options": options,
                         "dataset": meta.get("dataset"), "n": record.get("n"), "eps": record.get("eps"),
                         "norm": norm, "adversarial": distance.get("adversarial"),
                         "purified adv.": distance.get("purified_adversarial"),
                         "purified clean": distance.get("purified_clean"),
                         "farther": "–" if farther is None else "yes" if farther else "no",
                         "spread: seeds": spread.get("across_seeds"), "spread: inputs": spread.get("across_inputs"),
                         "seeds / inputs": spread.get("ratio"),
                         "compression (random, eps)": random_compression(record, norm, radius),
                         "compression (adversarial)": adversarial})
    return pd.DataFrame(rows)


def _analysis_section(records: Sequence[Mapping[str, Any]]) -> list[ExtraSection]:
    table = analysis_table(records)
    if table.empty:
        return []
    return [ExtraSection(title="Fixed-randomness analyses: distances, spread and compression",
                         html=frame_html(table, float_format=lambda v: f"{v:.4g}"), text=ANALYSIS_TEXT)]


def report_sections(table: pd.DataFrame, records: Sequence[Mapping[str, Any]],
                    out_dir: str | Path) -> list[ExtraSection]:
    """The fixed-vs-fresh table (``table`` from :func:`harness.analysis.gains.gain_table`), per eps the
    compression scatter of the analysis ``records`` (written to ``out_dir/figures``), then the analyses'
    own numbers (:func:`analysis_table`)."""
    if table.empty:
        return _analysis_section(records)
    extra = ["fresh_worst"] if "fresh_worst" in table else []
    shown = table[SETTING_COLUMNS + list(PROTOCOL_COLUMNS.values()) + extra + ["baseline", "gain_fixed",
                                                                               "gain_fresh"]]
    shown = shown.rename_axis(columns=None)  # no stray "protocol" header from the pivot
    sections = [ExtraSection(title="Robust gain under fixed vs fresh randomness",
                             html=frame_html(shown, float_format=lambda v: f"{100 * v:.2f}"),
                             text=_gain_text(table))]
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
                 + (f"Pearson r = {r:.3f} over {len(points)} settings." if not math.isnan(r) else
                    f"Pearson r needs two or more settings with varied values ({len(points)} here)."),
            images=(path.relative_to(Path(out_dir)).as_posix(),),
            caption="Each point is one defense setting."))
    return sections + _analysis_section(records)


def randomness_sections(engine: Engine, cells: pd.DataFrame, out_dir: Path,
                        baselines: Collection[str]) -> list[ExtraSection]:
    """:func:`report_sections` for the cells (a cells frame of the store behind ``engine``) and the
    analysis records (of ``harness analyse fixed-randomness``) in the same store; gains against the
    ``baselines`` (defense names)."""
    if cells.empty:
        return _analysis_section(load_records(engine))
    table = gain_table(cells, baselines, worst_of_n=worst_of_n_accuracy(engine))
    return report_sections(table, load_records(engine), out_dir)

"""The fixed-randomness study in the report (Liu & Wei, arXiv 2505.22839, findings (c) and (d)): the
fixed-vs-fresh gain table and the compression-vs-gain scatter, from the numbers of
:mod:`harness.analysis.gains`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import pandas as pd
from sqlalchemy.engine import Engine

from harness.analysis.gains import (PROTOCOL_COLUMNS, SETTING_COLUMNS, ScatterPoint, gain_table, load_records,
                                    pearson_r, scatter_points, worst_of_n_accuracy)
from harness.core.threat import Epsilon
from harness.report.figures import plt, save_figure
from harness.report.frame import safe_stem
from harness.report.html import ExtraSection, frame_html

__all__ = ["compression_scatter", "report_sections", "randomness_sections"]


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


def report_sections(table: pd.DataFrame, records: Sequence[Mapping[str, Any]],
                    out_dir: str | Path) -> list[ExtraSection]:
    """The fixed-vs-fresh table (``table`` from :func:`harness.analysis.gains.gain_table`) and, per eps,
    the compression scatter of the analysis ``records`` (written to ``out_dir/figures``)."""
    if table.empty:
        return []
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
                 f"Pearson r = {r:.3f} over {len(points)} settings.",
            images=(path.relative_to(Path(out_dir)).as_posix(),),
            caption="Each point is one defense setting."))
    return sections


def randomness_sections(engine: Engine, cells: pd.DataFrame, out_dir: Path,
                        baselines: Collection[str]) -> list[ExtraSection]:
    """:func:`report_sections` for the cells (a cells frame of the store behind ``engine``) and the
    analysis records (of ``harness analyse fixed-randomness``) in the same store; gains against the
    ``baselines`` (defense names)."""
    if cells.empty:
        return []
    table = gain_table(cells, baselines, worst_of_n=worst_of_n_accuracy(engine))
    return report_sections(table, load_records(engine), out_dir)

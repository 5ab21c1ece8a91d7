"""Reports from the results store: Markdown / LaTeX tables, a CSV of every cell, an HTML leaderboard.

The CLI's ``harness report`` calls :func:`write_reports`; the pieces are usable on their own:
:func:`cells_frame` (store -> DataFrame), :func:`aggregate_seeds`, :func:`build_tables`,
:func:`to_markdown`, :func:`to_latex`, :func:`render_html`, and the sections of the analyses
(:mod:`harness.report.quality`, :mod:`harness.report.randomness`).
"""

from harness.report.frame import aggregate_seeds, baseline_defenses, cells_frame, done_cells
from harness.report.html import ExtraSection, render_html
from harness.report.tables import LeaderTable, build_tables, to_latex, to_markdown, write_cells_csv
from harness.report.writer import FORMATS, installed_entries, write_reports

__all__ = ["FORMATS", "ExtraSection", "LeaderTable", "aggregate_seeds", "baseline_defenses", "build_tables",
           "cells_frame", "done_cells", "installed_entries", "render_html", "to_latex", "to_markdown",
           "write_cells_csv", "write_reports"]

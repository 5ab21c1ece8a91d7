"""The study index of a report: for each study (``leaderboards/studies/*.toml``) whose cells exist in the
store, how many of its cells are done and what it renders where. Computed from the study files and the
store only (:func:`harness.analysis.studies.study_progress`: nothing is run, built or loaded), and
deterministic: studies in name order, no timestamps."""

from __future__ import annotations

import logging
from typing import Sequence

import pandas as pd
from sqlalchemy.engine import Engine

from harness.analysis.studies import SECTIONS, Study, StudyProgress, load_studies, study_progress
from harness.core.errors import UsageError
from harness.report.html import ExtraSection, frame_html

__all__ = ["study_index", "studies_markdown", "studies_section"]

log = logging.getLogger(__name__)
TEXT = ("Each study is a file in leaderboards/studies: the grids of cells a paper's tables need "
        "(`harness run --study NAME` computes what is missing, `harness plan --study NAME` shows its cost). "
        "Done counts the study's stored cells against the cells its grids plan here.")


def study_index(engine: Engine, studies: Sequence[Study] | None = None) -> list[StudyProgress]:
    """The progress of every study (default: the study files found by
    :func:`harness.analysis.studies.study_dirs`) that has at least one done cell in the store."""
    if studies is None:
        try:
            studies = load_studies()
        except UsageError as exc:  # a broken study file must not stop the report
            log.warning("no study index: %s", exc)
            return []
    return [p for p in study_progress(sorted(studies, key=lambda s: s.name), engine) if p.done]


def _frame(progress: Sequence[StudyProgress]) -> pd.DataFrame:
    rows = [{"study": p.study.name, "title": p.study.title, "paper": p.study.paper,
             "done": f"{p.done}/{p.cells}" + (f" (+{p.unknown} keyed once built)" if p.unknown else ""),
             "renders": "; ".join(f"{r.label} ({SECTIONS[r.section]})" for r in p.study.renders),
             "not planned here": p.problem and "part of its grid: its data are not here"}
            for p in progress]
    return pd.DataFrame(rows, columns=["study", "title", "paper", "done", "renders", "not planned here"])


def studies_markdown(progress: Sequence[StudyProgress]) -> str:
    """``studies.md``: one section per study with its done count and what it renders ("" for none)."""
    if not progress:
        return ""
    lines = ["# Studies", "", TEXT, ""]
    for p in progress:
        lines += [f"## {p.study.name}: {p.study.title}", "", f"Paper: {p.study.paper}", "",
                  f"Cells done: {p.done} of {p.cells}" + (f" (and {p.unknown} keyed once built)" if p.unknown else ""),
                  ""]
        if p.problem:
            lines += [f"Not planned here: {p.problem}", ""]
        lines += [f"- {r.label}: {r.caption} ({SECTIONS[r.section]})" for r in p.study.renders]
        lines.append("")
    return "\n".join(lines)


def studies_section(progress: Sequence[StudyProgress]) -> list[ExtraSection]:
    """The page's "Studies" section (none when no study has a done cell)."""
    if not progress:
        return []
    return [ExtraSection(title="Studies", html=frame_html(_frame(progress)), text=TEXT)]

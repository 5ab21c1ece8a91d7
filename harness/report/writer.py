"""``harness report``: every report format from one results store, written under one directory.

Layout of ``out_dir``::

    index.html                        sortable leaderboard (html)
    leaderboard.md                    every table in one Markdown file (md)
    tables/<dataset>_<threat>_<eps>.md|.tex   one table per dataset / threat / eps (md, tex)
    cells.csv                         every cell, any status, with provenance (csv)
    representations.md                the DRA representation analyses, when stored (md)
    robust-training.md                the robust-training comparison, when its cells exist (md)
    studies.md                        the study index: each study with done cells, and how many (md)
    cells/<key>.html, cells/<key>.csv each finished cell's detail page and per-sample results (html;
                                      not in the returned list: one pair per cell)
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
from sqlalchemy.engine import Engine

import harness

from harness.analysis.best_known import best_known
from harness.analysis.gains import worst_of_n_accuracy
from harness.core.errors import UsageError
from harness.analysis.flags import cell_flags
from harness.results.queries import done_samples
from harness.report.cells import write_cell_pages
from harness.report.frame import aggregate_seeds, baseline_defenses, cells_frame, done_cells, results_stamp
from harness.report.html import ExtraSection, environment, render_html
from harness.report.readme import check_readme, readme_block, update_readme
from harness.report.quality import quality_sections
from harness.report.randomness import randomness_sections
from harness.report.representations import representation_sections, representations_markdown
from harness.report.robust_training import representation_rows, robust_training_markdown, robust_training_section
from harness.report.studies import studies_markdown, studies_section, study_index
from harness.report.tables import LeaderTable, build_tables, to_latex, to_markdown, write_cells_csv

__all__ = ["FORMATS", "write_reports"]

log = logging.getLogger(__name__)

FORMATS = ("md", "tex", "csv", "html")


def _write_text(path: Path, text: str) -> Path:
    """Write ``text`` atomically (temp file + rename), so a served page is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _remove_stale(directory: Path, ext: str, keep: Iterable[Path]) -> None:
    """Delete ``tables/*.<ext>`` left by an earlier report whose table no longer exists."""
    keep = {p.resolve() for p in keep}
    for old in directory.glob(f"*.{ext}") if directory.is_dir() else ():
        if old.resolve() not in keep:
            log.info("removing stale table %s", old)
            old.unlink()


def _combined_markdown(tables: Sequence[LeaderTable], generated_at: str, version: str,
                       unfinished: int) -> str:
    head = ["# harness leaderboard", "",
            f"Results as of {generated_at} (the last finished cell), rendered by harness {version}."]
    if unfinished:
        head.append(f"{unfinished} unfinished cell(s) (running or failed) are not in the tables.")
    if not tables:
        head += ["", "No results yet: this database has no finished cells."]
    return "\n".join(head) + "\n\n" + "\n".join(to_markdown(t) for t in tables)


def with_best_known(done: pd.DataFrame, samples: list[tuple[Any, ...]]) -> pd.DataFrame:
    """``done`` with ``best_known_acc``, ``best_known_attacks`` (the attack labels of its setting: the
    per-sample worst case over every attack stored for each cell's setting) and ``flags`` (every
    evaluation-quality flag of the cell, :func:`harness.analysis.flags.cell_flags`)."""
    if done.empty:
        return done.assign(best_known_acc=pd.Series(dtype=float), best_known_attacks=pd.Series(dtype=object),
                           flags=pd.Series(dtype=object))
    records = done.to_dict("records")
    known = best_known(records, samples)
    fooled_at: dict[str, list[int]] = {}
    for key, _, _, _, _, extra in samples:
        if isinstance(extra, dict) and isinstance(extra.get("fooled_at"), int) and extra["fooled_at"] >= 0:
            fooled_at.setdefault(key, []).append(extra["fooled_at"])
    flags = cell_flags(records, known, fooled_at)
    return done.assign(best_known_acc=[known[k].accuracy for k in done["cell_key"]],
                       best_known_attacks=[sorted(set(known[k].attacks.values())) for k in done["cell_key"]],
                       flags=[flags[k] for k in done["cell_key"]])


def cell_flag_map(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Cell key -> the evaluation-quality flags of every finished cell in the store."""
    done = with_best_known(done_cells(cells_frame(engine)), done_samples(engine))
    return dict(zip(done["cell_key"], done["flags"]))


def installed_entries() -> dict[tuple[str, str], dict[str, Any]]:
    """The metadata (:meth:`DefenseEntry.describe`) of the installed entries, by (name, version), for
    ``write_reports(installed=...)``: their reported numbers and roles override what old cells stored."""
    from harness.core.entry import defense_registry

    return {(i.value.name, i.value.version): i.value.describe() for i in defense_registry().items()}


def write_reports(engine: Engine, out_dir: Path, formats: Sequence[str] | str = FORMATS, *,
                  extra_sections: Sequence[ExtraSection] = (),
                  installed: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
                  templates: Path | None = None, generated_at: dt.datetime | None = None,
                  studies: Sequence[Any] | None = None, readme: Path | None = None) -> list[Path]:
    """Write the requested report ``formats`` (a subset of :data:`FORMATS`) for the store behind
    ``engine`` into ``out_dir``; returns the paths written, in a stable order.

    Only finished cells are ranked; seeds of the same setting are aggregated (mean ± sample std).
    ``formats`` may also be a comma-separated string. ``extra_sections`` are appended to the HTML
    page. ``installed`` (see :func:`installed_entries`) overrides the reported numbers stored with the
    cells and gives the roles (which defenses are baselines) of cells stored without one;
    ``templates`` is a folder of templates that override the shipped ones. An empty store gives a page
    saying so. Stale ``tables/*.md|.tex`` from an earlier report are removed; ``generated_at``
    (default: the store's :func:`~harness.report.frame.results_time`, so the same store renders the same
    bytes) is shown as UTC. With ``html``, every finished cell also gets a detail page and a
    per-sample CSV under ``cells/`` (:func:`harness.report.cells.write_cell_pages`; stale ones removed),
    which the returned list leaves out. ``studies`` (default: the study files,
    :func:`harness.analysis.studies.load_studies`) feed the study index. ``readme``: a Markdown file whose
    leaderboard block (:mod:`harness.report.readme`) is rewritten with the main table's top rows and a
    link to ``index.html``.
    """
    if isinstance(formats, str):  # "md,html" from a command line
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise UsageError(f"unknown report format(s) {', '.join(unknown)}; valid: {', '.join(FORMATS)}")
    if "html" in formats:
        environment(templates)  # a bad templates folder fails before anything is written
    if readme is not None:
        check_readme(readme)  # a README without the block fails before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = cells_frame(engine)
    stamp = results_stamp(cells, generated_at)
    samples = done_samples(engine)
    done = with_best_known(done_cells(cells), samples)
    current_reported = {k: v.get("reported", []) for k, v in (installed or {}).items()}
    tables = build_tables(aggregate_seeds(done, current_reported))
    log.info("%d cells (%d finished) -> %d tables", len(cells), len(done), len(tables))
    progress = study_index(engine, studies) if len(done) and {"md", "html"} & set(formats) else []
    written: list[Path] = []
    table_dir = out_dir / "tables"
    for ext, render in (("md", to_markdown), ("tex", to_latex)):
        if ext not in formats:
            continue
        paths = [_write_text(table_dir / f"{t.stem}.{ext}", render(t)) for t in tables]
        _remove_stale(table_dir, ext, paths)
        written += paths
        if ext == "md":
            written.append(_write_text(out_dir / "leaderboard.md", _combined_markdown(
                tables, stamp, harness.__version__, len(cells) - len(done))))
            analyses = representations_markdown(engine)
            if analyses:
                written.append(_write_text(out_dir / "representations.md", analyses))
            comparison = robust_training_markdown(cells, representation_rows(engine))
            if comparison:
                written.append(_write_text(out_dir / "robust-training.md", comparison))
            if progress:
                written.append(_write_text(out_dir / "studies.md", studies_markdown(progress)))
    if "csv" in formats:
        written.append(write_cells_csv(cells, out_dir / "cells.csv"))
    if "html" in formats:
        baselines = baseline_defenses(cells, installed)
        extra_sections = [*quality_sections(cells, out_dir, baselines=baselines),
                          *randomness_sections(engine, cells, out_dir, baselines),
                          *robust_training_section(cells, representation_rows(engine)),
                          *representation_sections(engine), *studies_section(progress), *extra_sections]
        pages = write_cell_pages(out_dir, done, samples, environment(templates), reported=current_reported,
                                 writer=_write_text)
        page = render_html(tables, cells, extra_sections=extra_sections, generated_at=generated_at,
                           templates=templates, cell_pages=pages, worst_of_n=worst_of_n_accuracy(engine))
        written.append(_write_text(out_dir / "index.html", page))
    if readme is not None:
        link = Path(os.path.relpath(out_dir / "index.html", Path(readme).parent)).as_posix()
        written.append(update_readme(readme, readme_block(tables, stamp, link)))
    for path in written:
        log.debug("wrote %s", path)
    return written

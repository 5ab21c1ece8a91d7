"""The HTML leaderboard: ``index.html`` rendered with Jinja2 from ``leaderboard.html.j2``.

The templates ship with harness as the package ``harness.templates`` (the repository's top-level
``templates/`` folder); a folder given as ``templates`` overrides any of them by name. Autoescaping is
on, so everything a plugin supplies (defense names, papers, citations, config strings) is escaped.
Only :class:`ExtraSection` ``html`` given as :class:`markupsafe.Markup` is inserted verbatim: wrap
content in ``Markup`` only after escaping whatever untrusted text it holds.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
from jinja2 import BaseLoader, ChoiceLoader, Environment, FileSystemLoader, PackageLoader, StrictUndefined
from markupsafe import Markup

import harness
from harness.core.errors import UsageError
from harness.report.frame import safe_stem
from harness.report.protocols import known_protocols, protocol_info, protocol_rank
from harness.report.tables import Column, LeaderTable, Num, Row

__all__ = ["ExtraSection", "TEMPLATES_PACKAGE", "frame_html", "environment", "render_html", "write_html"]

#: The package holding the shipped templates.
TEMPLATES_PACKAGE = "harness.templates"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtraSection:
    """An additional section of the page (a figure, a table made elsewhere, a note).

    ``html`` is escaped unless it is a :class:`markupsafe.Markup`; ``images`` are paths or URLs
    relative to ``index.html``, shown in order with ``caption`` under each.
    """

    title: str
    html: str | Markup = ""
    text: str = ""
    images: Sequence[str] = field(default_factory=tuple)
    caption: str = ""


def frame_html(table: pd.DataFrame, float_format: Callable[[float], str] | None = None) -> Markup:
    """``table`` as an HTML table in the leaderboard's style, for an :class:`ExtraSection`; pandas
    escapes every cell."""
    return Markup(table.to_html(index=False, escape=True, float_format=float_format, na_rep="–",
                                classes="board", border=0))


def environment(templates: Path | None = None) -> Environment:
    """A Jinja2 environment (autoescaping on) over the shipped templates, with those in the folder
    ``templates`` taking precedence by name."""
    loader: BaseLoader = PackageLoader(TEMPLATES_PACKAGE, "")
    if templates is not None:
        if not Path(templates).is_dir():
            raise UsageError(f"templates folder {str(templates)!r} does not exist")
        loader = ChoiceLoader([FileSystemLoader(templates), loader])
    return Environment(loader=loader, autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def _short(text: Any, n: int) -> str:
    return str(text or "")[:n]


def _provenance_view(items: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for p in items:
        commit = _short(p.get("git_commit"), 10) or "unknown"
        secs = p.get("seconds")
        out.append({
            "seed": str(p.get("seed")), "commit": commit + ("-dirty" if p.get("git_dirty") else ""),
            "commit_full": str(p.get("git_commit") or ""), "fingerprint": _short(p.get("fingerprint"), 12),
            "fingerprint_full": str(p.get("fingerprint") or ""), "preset": str(p.get("preset") or "–"),
            "classifier": str(p.get("classifier") or ""), "data_source": str(p.get("data_source") or ""),
            "run_date": str(p.get("run_date") or ""), "harness_version": str(p.get("harness_version") or ""),
            "device": str(p.get("device") or ""), "key": str(p.get("cell_key") or ""),
            "attack_params": str(p.get("attack_params") or ""),
            "seconds": f"{secs:.0f} s" if isinstance(secs, (int, float)) and secs == secs else "",
        })
    return out


def _legend(protocols: Sequence[str]) -> list[dict[str, str]]:
    """Protocol legend items: raw name, tier label, description, CSS tier class."""
    return [dict(zip(("protocol", "label", "desc"), (p, *protocol_info(p))), tier=safe_stem(p))
            for p in protocols]


def _cell_view(col: Column, row: Row, table: LeaderTable, tid: str) -> dict[str, Any]:
    """One ``<td>``: display text (``main`` and the ``± pm`` part), sort key, tooltip, link."""
    value = row.values.get(col.key)
    label, desc = protocol_info(row.protocol)
    cell: dict[str, Any] = {"key": col.key, "numeric": col.numeric, "reported": col.reported,
                            "main": "", "pm": "", "sort": "", "title": "", "href": ""}
    if isinstance(value, Num):
        cell["main"], _, cell["pm"] = value.text(" ± ").partition(" ± ")
        cell["sort"] = "" if value.sort_value is None else repr(round(value.sort_value, 6))
        what = f"{col.title} accuracy" if col.key in ("clean", "robust", "avg") else col.title
        cell["title"] = (f"{col.title}: printed in the paper (see source)" if col.reported else
                         f"{what}, measured — {label} ({row.protocol}), {row.values.get('attack', '')}, "
                         f"n={row.values.get('n')}, {row.values.get('seeds')} seed(s)")
    elif col.key == "ref":
        if row.ref:
            cell.update(main=f"[{row.ref}]", sort=str(row.ref), href=f"#{tid}-ref{row.ref}")
    elif col.key == "protocol":
        cell.update(main=str(value), sort=str(protocol_rank(row.protocol)[0]), title=f"{label}: {desc}")
    else:
        cell["main"] = cell["sort"] = "" if value is None else str(value)
        if col.key == "defense":
            cell["title"] = str((table.entries.get(str(value)) or {}).get("paper") or "")
            cell["href"] = f"#entry-{safe_stem(value)}"
    return cell


def _table_view(table: LeaderTable, index: int) -> dict[str, Any]:
    """What the template needs for one table (all values plain strings, escaped by Jinja)."""
    tid = f"t{index}-{table.stem or safe_stem(table.dataset, table.threat, table.eps_text)}"
    columns = [{"title": c.title, "numeric": c.numeric, "reported": c.reported,
                "title_attr": "Number printed in the paper, not measured by harness" if c.reported else ""}
               for c in table.columns]
    rows = [{"cells": [_cell_view(c, row, table, tid) for c in table.columns], "protocol": row.protocol,
             "tier": safe_stem(row.protocol), "note": row.note,
             "provenance": _provenance_view(row.provenance)}
            for row in table.rows]
    return {"id": tid, "title": table.title, "notes": table.notes, "columns": columns, "rows": rows,
            "references": table.references, "legend": _legend(table.protocols)}


def _entries_view(tables: Sequence[LeaderTable]) -> list[dict[str, str]]:
    entries: dict[str, dict[str, Any]] = {}
    for table in tables:
        for name, entry in table.entries.items():
            entries.setdefault(name, entry or {})
    return [{"name": name, "anchor": f"entry-{safe_stem(name)}", "version": str(e.get("version") or ""),
             "kind": str(e.get("kind") or ""), "paper": str(e.get("paper") or ""),
             "citation": str(e.get("citation") or ""),
             "stochastic": "stochastic" if e.get("stochastic") else "deterministic",
             "differentiable": "differentiable" if e.get("differentiable", True) else "non-differentiable"}
            for name, e in sorted(entries.items(), key=lambda kv: kv[0].lower())]


def _last_line(text: Any, limit: int = 300) -> str:
    """The last non-empty line of an error message (a traceback's summary), cut to ``limit``."""
    lines = [ln for ln in str(text or "").splitlines() if ln.strip()]
    return lines[-1].strip()[:limit] if lines else ""


def _unfinished_view(cells: pd.DataFrame) -> dict[str, Any]:
    if cells.empty:
        return {"total": 0, "done": 0, "counts": [], "cells": []}
    pending = cells[cells["status"] != "done"]
    counts = sorted(pending["status"].astype(str).value_counts().items())
    listed = [{"defense": str(r["defense"]), "where": f"{r['dataset']} {r['threat']} {r['eps_text']}",
               "attack": str(r["attack_label"]), "protocol": str(r["protocol"]), "seed": str(r["seed"]),
               "status": str(r["status"]), "progress": f"{r['n_done']}/{r['n']}",
               "error": _last_line(r["error"])}
              for r in pending.to_dict("records")]
    return {"total": len(cells), "done": int((cells["status"] == "done").sum()),
            "counts": [(str(k), int(v)) for k, v in counts], "cells": listed}


def render_html(tables: Sequence[LeaderTable], cells: pd.DataFrame, *,
                extra_sections: Sequence[ExtraSection] = (), generated_at: dt.datetime | None = None,
                templates: Path | None = None) -> str:
    """The leaderboard page as a string.

    ``cells`` is :func:`harness.report.frame.cells_frame` (all statuses: unfinished ones are counted
    and listed); ``tables`` come from :func:`harness.report.tables.build_tables`; ``templates`` is a
    folder whose templates override the shipped ones (see :func:`environment`).
    """
    generated_at = (generated_at or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    commits = sorted({str(c) for c in cells.get("run_git_commit", pd.Series(dtype=object)).dropna() if c})
    known = known_protocols()
    used = {p for t in tables for p in t.protocols}
    legend = _legend(known + sorted(used - set(known), key=protocol_rank))
    template = environment(templates).get_template("leaderboard.html.j2")
    return template.render(
        title="harness leaderboard", harness_version=harness.__version__,
        generated_at=generated_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        tables=[_table_view(t, i) for i, t in enumerate(tables, 1)], entries=_entries_view(tables),
        summary=_unfinished_view(cells), legend=legend, commits=[_short(c, 10) for c in commits],
        extra_sections=list(extra_sections))


def write_html(path: Path, tables: Sequence[LeaderTable], cells: pd.DataFrame, **kwargs: Any) -> Path:
    """Render :func:`render_html` into ``path`` (UTF-8) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(tables, cells, **kwargs), encoding="utf-8")
    log.info("wrote %s", path)
    return path

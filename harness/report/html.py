"""The HTML leaderboard: ``index.html`` rendered with Jinja2 from ``leaderboard.html.j2``.

The templates ship with harness as the package ``harness.templates`` (the repository's top-level
``templates/`` folder); a folder given as ``templates`` overrides any of them by name. Autoescaping is
on, so everything a plugin supplies (defense names, papers, citations, config strings) is escaped.
Only :class:`ExtraSection` ``html`` given as :class:`markupsafe.Markup` is inserted verbatim: wrap
content in ``Markup`` only after escaping whatever untrusted text it holds.

The page works offline and from ``file://``: its one script is inlined, made of the vendored
npm package ``tablesort`` (``templates/tablesort*.js``, MIT, see ``templates/tablesort.LICENCE``) for
sortable columns and a few lines of harness's own for the search box and the
protocol-tier tabs. Robust accuracy against eps is drawn as inline SVG computed here, in Python.
Everything is sorted, and the page is stamped with the store's own time (its last finished cell), so the
same store renders the same bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
from jinja2 import BaseLoader, ChoiceLoader, Environment, FileSystemLoader, PackageLoader, StrictUndefined
from markupsafe import Markup

import harness
from harness.core.errors import UsageError
from harness.evaluation.planning import attack_passes
from harness.report.frame import results_stamp, safe_stem
from harness.report.protocols import known_protocols, protocol_info, protocol_rank
from harness.report.tables import FLAG_TEXT, LeaderTable, Num, Row

__all__ = ["DELTA_HIGHLIGHT", "ExtraSection", "FIXED_VS_FRESH_TITLE", "TEMPLATES_PACKAGE", "WORST_OF_N",
           "frame_html", "environment", "render_html", "section_anchor", "vendored_script",
           "vendored_library", "write_html"]

#: The package holding the shipped templates.
TEMPLATES_PACKAGE = "harness.templates"
#: A measured-minus-reported difference of at least this many points (robust accuracy) is highlighted.
DELTA_HIGHLIGHT = 5.0
#: The tab of the ``adaptive-eot`` rows judged worst-of-N (correct on every fresh re-draw).
WORST_OF_N = "worst-of-n"
#: The title of the randomness section (:mod:`harness.report.randomness`) the tables link to.
FIXED_VS_FRESH_TITLE = "Robust gain under fixed vs fresh randomness"
#: The vendored table library (files of the package ``harness.templates``): its name, its built files in
#: load order and its licence file. Flat beside the templates: a data folder would look like a package.
_VENDOR = ("tablesort", ("tablesort.min.js", "tablesort.number.min.js"), "tablesort.LICENCE")
_BANNER = re.compile(r"\A/\*!.*?\*/\s*", re.S)
_MISSING_SORT = "-999999"  # a missing number sorts below every real one (tablesort strips "e" notation)

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


@lru_cache(maxsize=1)
def vendored_library() -> tuple[str, str, str]:
    """(name, version, licence) of the vendored table library, read from its files' banner."""
    _, files, _ = _VENDOR
    text = resources.files(TEMPLATES_PACKAGE).joinpath(files[0]).read_text(encoding="utf-8")
    found = re.search(r"tablesort v(\S+)", text)
    licence = re.search(r"Licensed (\w+)", text)
    return _VENDOR[0], found.group(1) if found else "unknown", licence.group(1) if licence else "unknown"


@lru_cache(maxsize=1)
def vendored_script() -> Markup:
    """The vendored table library, ready to inline into the page's ``<script>``: its banner (which
    names a web address, and the page names none) is replaced by a comment with its name, version,
    copyright and licence file. Raises if a file could close the script element."""
    _, files, licence_file = _VENDOR
    name, version, licence = vendored_library()
    base = resources.files(TEMPLATES_PACKAGE)
    parts = [f"/* {name} {version} (npm package \"{name}\"), Copyright (c) Tristen Brown, {licence} licence: "
             f"harness/templates/{licence_file} */"]
    for file in files:
        code = _BANNER.sub("", base.joinpath(file).read_text(encoding="utf-8")).strip()
        if re.search(r"</script|<!--", code, re.IGNORECASE):
            raise ValueError(f"vendored {file} cannot be inlined into a <script> element")
        parts.append(code)
    return Markup("\n".join(parts))


def section_anchor(title: str) -> str:
    """The ``id`` of an extra section: ``sec-`` and its title as a lower-case file stem."""
    return "sec-" + safe_stem(title).lower()


def _short(text: Any, n: int) -> str:
    return str(text or "")[:n]


def _provenance_view(items: list[dict[str, Any]], cell_pages: Mapping[str, str]) -> list[dict[str, str]]:
    out = []
    for p in items:
        commit = _short(p.get("git_commit"), 10) or "unknown"
        secs = p.get("seconds")
        key = str(p.get("cell_key") or "")
        out.append({
            "seed": str(p.get("seed")), "commit": commit + ("-dirty" if p.get("git_dirty") else ""),
            "commit_full": str(p.get("git_commit") or ""), "fingerprint": _short(p.get("fingerprint"), 12),
            "fingerprint_full": str(p.get("fingerprint") or ""), "preset": str(p.get("preset") or "–"),
            "classifier": str(p.get("classifier") or ""), "data_source": str(p.get("data_source") or ""),
            "run_date": str(p.get("run_date") or ""), "harness_version": str(p.get("harness_version") or ""),
            "device": str(p.get("device") or ""), "key": key,
            "attack_params": str(p.get("attack_params") or ""),
            "seconds": f"{secs:.0f} s" if _finite(secs) else "", "page": cell_pages.get(key, ""),
        })
    return out


def _legend(protocols: Sequence[str]) -> list[dict[str, str]]:
    """Protocol legend items: raw name, tier label, description, CSS tier class."""
    return [dict(zip(("protocol", "label", "desc"), (p, *protocol_info(p))), tier=safe_stem(p))
            for p in protocols]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sort_num(value: float | None, digits: int = 6) -> str:
    return _MISSING_SORT if value is None else repr(round(value, digits))


@dataclass(frozen=True)
class _Col:
    """A column of the HTML table: a :class:`harness.report.tables.Column` of the table or one the page
    adds."""

    key: str
    title: str
    numeric: bool = False
    reported: bool = False
    help: str = ""


_PAGE_COLUMNS = {
    "rank": _Col("rank", "Rank", True, help="Rank within the row's protocol tier in this table, by best-known "
                                            "robust accuracy (then this row's robust accuracy)"),
    "architecture": _Col("architecture", "Architecture", help="From the entry's model card"),
    "extra_data": _Col("extra_data", "Extra data", help="Training data beyond the dataset's own training split "
                                                        "(synthetic or external), from the entry's model card"),
    "venue": _Col("venue", "Venue", help="Where the entry's paper appeared"),
    "worst": _Col("worst", "Worst-of-N", True, help="Fresh randomness judged worst-of-N: a sample counts only if "
                                                    "it is classified correctly on every one of N re-draws"),
    "unreliable": _Col("unreliable", "Potentially unreliable",
                       help="Evaluation-quality flags of the row's cells (after AutoAttack's checks); any flag "
                            "makes the evaluation potentially unreliable"),
    "nfe": _Col("nfe", "NFE", True, help="Network function evaluations per prediction, from the model card"),
    "sec_per_image": _Col("sec_per_image", "s / image", True,
                          help="Seconds of the cell's evaluation per test image (mean over the row's cells)"),
    "attack_passes": _Col("attack_passes", "Attack passes", True,
                          help="Network passes of the attack per attacked point: as recorded by the cell, else "
                               "(≈) estimated from the attack's budget (steps × restarts × EOT, queries)"),
    "delta": _Col("delta", "Δ robust", True,
                  help=f"Measured best-known minus reported robust accuracy, in points; highlighted when at "
                       f"least {DELTA_HIGHLIGHT:g} points apart"),
}


def _page_columns(table: LeaderTable, has_worst: bool) -> list[_Col]:
    """The page's columns: the table's own (its ``Flags`` column becomes ``Potentially unreliable``,
    always shown), plus rank, model-card, worst-of-N, cost and reported-vs-measured columns."""
    cols = []  # the rank comes first on the page, as a row's ``rank`` (``cells`` keep the table's order)
    for col in table.columns:
        if col.key == "flags":
            continue
        if col.key == "protocol":
            cols += [_PAGE_COLUMNS[k] for k in ("architecture", "extra_data", "venue")]
        title = "Robust" if col.key != "robust" else "Robust (this attack)"
        cols.append(_Col(col.key, col.title if col.key != "robust" else title, col.numeric, col.reported,
                         "Number printed in the paper, not measured by harness" if col.reported else ""))
        if col.key == "best" and has_worst:
            cols.append(_PAGE_COLUMNS["worst"])
        if col.key == "seeds":
            cols += [_PAGE_COLUMNS[k] for k in ("unreliable", "nfe", "sec_per_image", "attack_passes")]
        if col.key == "reported_robust":
            cols.append(_PAGE_COLUMNS["delta"])
    return cols


def _metadata(table: LeaderTable, defense: Any) -> dict[str, Any]:
    entry = table.entries.get(str(defense)) or {}
    meta = entry.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _extra_data_text(meta: Mapping[str, Any]) -> str:
    extra = meta.get("extra_data")
    if not isinstance(extra, dict):
        return "no" if meta else ""
    size = extra.get("size")
    amount = f"{size:,}" if isinstance(size, int) and not isinstance(size, bool) else str(size or "")
    source = f", {extra['source']}" if extra.get("source") else ""
    return f"{extra.get('kind') or 'extra'} ({amount}{source})" if amount or source else str(extra.get("kind") or "")


def _row_costs(row: Row, cell_metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Seconds per image and attack passes per attacked point (recorded, else estimated) of a row."""
    n = row.values.get("n")
    rates = [float(p["seconds"]) / n for p in row.provenance
             if _finite(p.get("seconds")) and isinstance(n, int) and n > 0]
    recorded = [m.get("attack_passes") for p in row.provenance
                for m in [cell_metrics.get(str(p.get("cell_key")), {})] if _finite(m.get("attack_passes"))]
    passes, estimated = (float(sum(recorded)) / len(recorded), False) if recorded else (None, True)
    if passes is None:
        for p in row.provenance:
            try:
                params = json.loads(p.get("attack_params") or "null")
                budget = attack_passes(params) if isinstance(params, dict) else None
            except (ValueError, KeyError, TypeError):
                budget = None
            if budget is not None:
                passes = float(sum(budget))
                break
    return {"sec": sum(rates) / len(rates) if rates else None, "passes": passes, "estimated": estimated}


def _worst_value(row: Row, worst_of_n: Mapping[str, float]) -> float | None:
    """Mean worst-of-N accuracy over the row's cells, if every cell has one."""
    keys = [str(p.get("cell_key")) for p in row.provenance]
    if not keys or not all(k in worst_of_n for k in keys):
        return None
    return sum(worst_of_n[k] for k in keys) / len(keys)


def _ranks(rows: Sequence[Row]) -> list[int]:
    """Competition ranks (1, 1, 3) within each protocol, by best-known then robust accuracy."""
    def score(row: Row) -> tuple[float, float]:
        best, robust = row.values.get("best"), row.values.get("robust")
        b = best.mean if isinstance(best, Num) and best.mean is not None else -1.0
        r = robust.mean if isinstance(robust, Num) and robust.mean is not None else -1.0
        return (round(b, 9), round(r, 9))
    ranks = [0] * len(rows)
    for protocol in sorted({r.protocol for r in rows}):
        members = sorted((i for i, r in enumerate(rows) if r.protocol == protocol),
                         key=lambda i: (tuple(-v for v in score(rows[i])), i))
        for place, i in enumerate(members):
            prev = members[place - 1] if place else None
            ranks[i] = ranks[prev] if prev is not None and score(rows[prev]) == score(rows[i]) else place + 1
    return ranks


def _blank(col: _Col) -> dict[str, Any]:
    return {"key": col.key, "numeric": col.numeric, "reported": col.reported, "main": "", "pm": "",
            "sort": "", "title": "", "href": "", "cls": ""}


def _cell_view(col: _Col, row: Row, table: LeaderTable, tid: str) -> dict[str, Any]:
    """One ``<td>`` of a table column: display text (``main`` and the ``± pm`` part), sort key, tooltip,
    link."""
    value = row.values.get(col.key)
    label, desc = protocol_info(row.protocol)
    cell = _blank(col)
    if isinstance(value, Num):
        cell["main"], _, cell["pm"] = value.text(" ± ").partition(" ± ")
        cell["sort"] = _sort_num(value.sort_value)
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
        cell["main"] = "" if value is None else str(value)
        cell["sort"] = _sort_num(float(value)) if col.numeric and _finite(value) else cell["main"]
        if col.key == "defense":
            cell["title"] = str((table.entries.get(str(value)) or {}).get("paper") or "")
            cell["href"] = f"#entry-{safe_stem(value)}"
    return cell


def _page_cell(col: _Col, row: Row, table: LeaderTable, worst: float | None,
               costs: Mapping[str, Any]) -> dict[str, Any]:
    """One ``<td>`` of a column the page adds (model card, cost, worst-of-N, flags, delta)."""
    cell = _blank(col)
    meta = _metadata(table, row.values.get("defense"))
    if col.key == "architecture":
        params = meta.get("parameters")
        cell["main"] = cell["sort"] = str(meta.get("architecture") or "")
        if _finite(params):
            cell["title"] = f"{params:,} parameters"
    elif col.key == "extra_data":
        cell["main"] = cell["sort"] = _extra_data_text(meta)
    elif col.key == "venue":
        year = meta.get("year")
        cell["main"] = cell["sort"] = " ".join(str(v) for v in (meta.get("venue"), year) if v)
    elif col.key == "worst":
        cell.update(main="–" if worst is None else f"{100 * worst:.2f}",
                    sort=_sort_num(None if worst is None else 100 * worst))
    elif col.key == "unreliable":
        flags = [f for f in str(row.values.get("flags") or "").split(", ") if f]
        cell.update(main=("yes: " + ", ".join(flags)) if flags else "no", sort="1" if flags else "0",
                    cls="flagged" if flags else "clear",
                    title="; ".join(f"{f}: {FLAG_TEXT.get(f, 'see harness docs')}" for f in flags)
                    or "No evaluation-quality flag raised")
    elif col.key == "nfe":
        nfe = meta.get("nfe")
        cell.update(main=str(nfe) if _finite(nfe) else "–", sort=_sort_num(float(nfe) if _finite(nfe) else None),
                    title="" if _finite(nfe) else "not declared by the entry")
    elif col.key == "sec_per_image":
        sec = costs.get("sec")
        cell.update(main="–" if sec is None else f"{sec:.3g}", sort=_sort_num(sec))
    elif col.key == "attack_passes":
        passes = costs.get("passes")
        mark = "≈" if costs.get("estimated") else ""
        cell.update(main="–" if passes is None else f"{mark}{passes:,.0f}", sort=_sort_num(passes),
                    title=("estimated from the attack's budget" if mark else "recorded by the cell")
                    if passes is not None else "unknown for this attack")
    elif col.key == "delta":
        best, reported = row.values.get("best"), row.values.get("reported_robust")
        if isinstance(best, Num) and isinstance(reported, Num) and best.mean is not None \
                and reported.mean is not None:
            delta = 100 * best.mean - reported.mean
            large = abs(delta) >= DELTA_HIGHLIGHT
            cell.update(main=f"{delta:+.2f}", sort=_sort_num(delta), cls="delta-large" if large else "",
                        title=f"best-known {100 * best.mean:.2f} vs reported {reported.mean:.2f}"
                              + (f": {abs(delta):.2f} points apart" if large else ""))
        else:
            cell.update(main="–", sort=_MISSING_SORT)
    return cell


def _search_text(row: Row, table: LeaderTable) -> str:
    meta = _metadata(table, row.values.get("defense"))
    parts = [row.values.get(k) for k in ("defense", "classifier", "preset", "variant", "data", "protocol", "attack")]
    parts += [meta.get("architecture"), meta.get("venue"), meta.get("year"), _extra_data_text(meta),
              protocol_info(row.protocol)[0], (table.entries.get(str(row.values.get("defense"))) or {}).get("paper")]
    return " ".join(str(p) for p in parts if p not in (None, "")).lower()


def _tabs(rows: Sequence[dict[str, Any]], protocols: Sequence[str]) -> list[dict[str, Any]]:
    """The tier tabs of a table: All, every known protocol (and any other the table uses), worst-of-N
    after ``adaptive-eot``; each with its row count."""
    known = known_protocols()
    order = known + sorted(set(protocols) - set(known), key=protocol_rank)
    tabs = [{"tier": "all", "label": "All tiers", "title": "Every row of the table", "count": len(rows)}]
    for protocol in order:
        label, desc = protocol_info(protocol)
        tier = safe_stem(protocol)
        tabs.append({"tier": tier, "label": label, "title": f"{protocol}: {desc}",
                     "count": sum(tier in r["tiers"].split() for r in rows)})
        if protocol == "adaptive-eot":
            tabs.append({"tier": WORST_OF_N, "label": "Worst-of-N",
                         "title": "Adaptive-EOT rows judged worst-of-N (correct on every fresh re-draw)",
                         "count": sum(WORST_OF_N in r["tiers"].split() for r in rows)})
    return tabs


def _table_view(table: LeaderTable, index: int, *, cell_pages: Mapping[str, str],
                cell_metrics: Mapping[str, Mapping[str, Any]], worst_of_n: Mapping[str, float],
                fixed_vs_fresh: str) -> dict[str, Any]:
    """What the template needs for one table (all values plain strings, escaped by Jinja)."""
    tid = f"t{index}-{table.stem or safe_stem(table.dataset, table.threat, table.eps_text)}"
    worst = [_worst_value(r, worst_of_n) if r.protocol == "adaptive-eot" else None for r in table.rows]
    columns = _page_columns(table, any(w is not None for w in worst))
    ranks = _ranks(table.rows)
    own = {c.key for c in table.columns}
    rows = []
    for row, rank, w in zip(table.rows, ranks, worst):
        costs = _row_costs(row, cell_metrics)
        cells = [_cell_view(c, row, table, tid) if c.key in own else _page_cell(c, row, table, w, costs)
                 for c in columns]
        tiers = safe_stem(row.protocol) + (f" {WORST_OF_N}" if w is not None else "")
        rows.append({"rank": str(rank), "cells": cells, "protocol": row.protocol, "tier": safe_stem(row.protocol), "tiers": tiers,
                     "search": _search_text(row, table), "note": row.note,
                     "provenance": _provenance_view(row.provenance, cell_pages)})
    protocols = set(table.protocols)
    gap = fixed_vs_fresh if {"adaptive", "adaptive-eot"} <= protocols else ""
    rank = _PAGE_COLUMNS["rank"]
    return {"id": tid, "title": table.title, "notes": table.notes,
            "rank": {"title": rank.title, "title_attr": rank.help},
            "columns": [{"title": c.title, "numeric": c.numeric, "reported": c.reported, "title_attr": c.help,
                         "key": c.key} for c in columns],
            "rows": rows, "tabs": _tabs(rows, table.protocols), "fixed_vs_fresh": gap,
            "references": table.references, "legend": _legend(table.protocols)}


def _entries_view(tables: Sequence[LeaderTable]) -> list[dict[str, str]]:
    entries: dict[str, dict[str, Any]] = {}
    for table in tables:
        for name, entry in table.entries.items():
            entries.setdefault(name, entry or {})
    out = []
    for name, e in sorted(entries.items(), key=lambda kv: (kv[0].lower(), kv[0])):
        meta = e.get("metadata") if isinstance(e.get("metadata"), dict) else {}
        card = [f"{meta['architecture']}" if meta.get("architecture") else "",
                f"{meta['parameters']:,} parameters" if _finite(meta.get("parameters")) else "",
                f"extra data: {_extra_data_text(meta)}" if meta.get("extra_data") else "",
                f"NFE {meta['nfe']}" if _finite(meta.get("nfe")) else "",
                " ".join(str(v) for v in (meta.get("venue"), meta.get("year")) if v)]
        out.append({"name": name, "anchor": f"entry-{safe_stem(name)}", "version": str(e.get("version") or ""),
                    "kind": str(e.get("kind") or ""), "paper": str(e.get("paper") or ""),
                    "citation": str(e.get("citation") or ""),
                    "stochastic": "stochastic" if e.get("stochastic") else "deterministic",
                    "differentiable": "differentiable" if e.get("differentiable", True) else "non-differentiable",
                    "card": " · ".join(c for c in card if c)})
    return out


_CURVE_KEYS = ("defense", "defense_version", "classifier", "preset", "defense_options", "variant", "data",
               "protocol", "n")
_SVG = {"width": 260, "height": 150, "left": 34, "right": 22, "top": 10, "bottom": 30}


def _curve_svg(points: Sequence[tuple[float, str, float, float | None]], clean: float | None) -> dict[str, Any]:
    """Geometry of one eps curve: ``points`` are (eps, eps text, best-known, robust) in percent, the
    curve starts at eps 0 from ``clean``; every coordinate is computed here."""
    w, h = _SVG["width"], _SVG["height"]
    x0, x1, y0, y1 = _SVG["left"], w - _SVG["right"], h - _SVG["bottom"], _SVG["top"]
    top = max(p[0] for p in points)

    def x(eps: float) -> float:
        return round(x0 + (x1 - x0) * (eps / top if top > 0 else 0), 1)

    def y(acc: float) -> float:
        return round(y0 + (y1 - y0) * max(0.0, min(100.0, acc)) / 100, 1)

    line = ([(0.0, clean)] if clean is not None else []) + [(p[0], p[2]) for p in points]
    dots = [{"x": x(e), "y": y(b), "title": f"ε = {t}: best-known {b:.2f}%"} for e, t, b, _ in points]
    if clean is not None:
        dots.insert(0, {"x": x(0.0), "y": y(clean), "title": f"ε = 0: clean {clean:.2f}%"})
    return {"width": w, "height": h, "x0": x0, "x1": x1, "y0": y0, "y1": y1,
            "polyline": " ".join(f"{x(e)},{y(a)}" for e, a in line), "dots": dots,
            "xticks": [{"x": x(0.0), "label": "0"}] + [{"x": x(e), "label": t} for e, t, _, _ in points],
            "yticks": [{"y": y(v), "label": str(v)} for v in (0, 50, 100)]}


def _curves_view(tables: Sequence[LeaderTable]) -> list[dict[str, Any]]:
    """Robust accuracy (best-known) against eps: one small SVG per setting measured at two or more eps,
    grouped by dataset and threat (tables of clean test data only)."""
    groups: dict[tuple[str, str], dict[tuple[str, ...], dict[float, dict[str, Any]]]] = {}
    titles: dict[tuple[str, str], str] = {}
    for table in tables:
        if table.variants:
            continue
        group = groups.setdefault((table.dataset, table.threat), {})
        titles[(table.dataset, table.threat)] = table.title.rsplit(" · ε", 1)[0]
        for row in table.rows:
            best, robust, clean = (row.values.get(k) for k in ("best", "robust", "clean"))
            value = best.sort_value if isinstance(best, Num) else None
            value = value if value is not None else (robust.sort_value if isinstance(robust, Num) else None)
            if value is None:
                continue
            setting = tuple(str(row.values.get(k, "")) for k in _CURVE_KEYS)
            at = group.setdefault(setting, {}).setdefault(table.eps, {"text": table.eps_text, "best": value,
                                                                       "clean": [], "attacks": set()})
            at["best"] = min(at["best"], value)
            at["attacks"].add(str(row.values.get("attack", "")))
            if isinstance(clean, Num) and clean.sort_value is not None:
                at["clean"].append(clean.sort_value)
    out = []
    for (dataset, threat), settings in sorted(groups.items()):
        figures = []
        for setting, by_eps in settings.items():
            if len(by_eps) < 2:
                continue
            names = dict(zip(_CURVE_KEYS, setting))
            points = [(eps, at["text"], at["best"], None) for eps, at in sorted(by_eps.items())]
            cleans = [c for at in by_eps.values() for c in at["clean"]]
            extra = [names[k] for k in ("classifier", "preset", "defense_options", "variant", "data") if names[k]]
            figures.append({
                "sort": (names["defense"].lower(), protocol_rank(names["protocol"]), setting),
                "defense": names["defense"], "protocol": names["protocol"], "tier": safe_stem(names["protocol"]),
                "detail": " · ".join(extra + [f"n={names['n']}"]),
                "attacks": ", ".join(sorted({a for at in by_eps.values() for a in at["attacks"]})),
                "svg": _curve_svg(points, sum(cleans) / len(cleans) if cleans else None)})
        figures.sort(key=lambda f: f["sort"])
        if figures:
            out.append({"title": titles[(dataset, threat)], "figures": figures})
    return out


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


def _cell_metrics(cells: pd.DataFrame) -> dict[str, Mapping[str, Any]]:
    if cells.empty or "metrics" not in cells:
        return {}
    return {str(k): m for k, m in zip(cells["cell_key"], cells["metrics"]) if isinstance(m, dict)}


def render_html(tables: Sequence[LeaderTable], cells: pd.DataFrame, *,
                extra_sections: Sequence[ExtraSection] = (), generated_at: dt.datetime | None = None,
                templates: Path | None = None, cell_pages: Mapping[str, str] | None = None,
                worst_of_n: Mapping[str, float] | None = None) -> str:
    """The leaderboard page as a string.

    ``cells`` is :func:`harness.report.frame.cells_frame` (all statuses: unfinished ones are counted
    and listed); ``tables`` come from :func:`harness.report.tables.build_tables`; ``templates`` is a
    folder whose templates override the shipped ones (see :func:`environment`). ``cell_pages`` maps
    cell keys to their detail pages (relative URLs, :func:`harness.report.cells.write_cell_pages`);
    ``worst_of_n`` maps ``adaptive-eot`` cell keys to their worst-of-N accuracy
    (:func:`harness.analysis.gains.worst_of_n_accuracy`).
    """
    commits = sorted({str(c) for c in cells.get("run_git_commit", pd.Series(dtype=object)).dropna() if c})
    known = known_protocols()
    used = {p for t in tables for p in t.protocols}
    legend = _legend(known + sorted(used - set(known), key=protocol_rank))
    anchors = [section_anchor(s.title) for s in extra_sections]
    fixed_vs_fresh = next((a for s, a in zip(extra_sections, anchors) if s.title == FIXED_VS_FRESH_TITLE), "")
    metrics = _cell_metrics(cells)
    views = [_table_view(t, i, cell_pages=cell_pages or {}, cell_metrics=metrics, worst_of_n=worst_of_n or {},
                         fixed_vs_fresh=fixed_vs_fresh) for i, t in enumerate(tables, 1)]
    name, version, licence = vendored_library()
    template = environment(templates).get_template("leaderboard.html.j2")
    return template.render(
        title="harness leaderboard", harness_version=harness.__version__,
        generated_at=results_stamp(cells, generated_at),
        tables=views, entries=_entries_view(tables), curves=_curves_view(tables),
        summary=_unfinished_view(cells), legend=legend, commits=[_short(c, 10) for c in commits],
        extra_sections=list(extra_sections), extra_anchors=anchors, fixed_vs_fresh=fixed_vs_fresh,
        delta_highlight=f"{DELTA_HIGHLIGHT:g}", vendor_js=vendored_script(),
        vendor={"name": name, "version": version, "licence": licence})


def write_html(path: Path, tables: Sequence[LeaderTable], cells: pd.DataFrame, **kwargs: Any) -> Path:
    """Render :func:`render_html` into ``path`` (UTF-8) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(tables, cells, **kwargs), encoding="utf-8")
    log.info("wrote %s", path)
    return path

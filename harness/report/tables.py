"""Leaderboard tables (one per dataset / threat / eps, in the form of the MAEP paper's Table 3) and
their Markdown, LaTeX and CSV renderings.

:func:`build_tables` turns seed-aggregated cells (:func:`harness.report.frame.aggregate_seeds`) into
format-neutral :class:`LeaderTable` objects; :func:`to_markdown` / :func:`to_latex` render one table,
and :func:`write_cells_csv` writes every cell with its provenance.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from harness.analysis.flags import CROSS_CELL_HELP
from harness.data.variants import VARIANT_SEPARATOR
from harness.evaluation.checks import FLAG_HELP
from harness.report.frame import canonical_json, data_label, safe_stem
from harness.report.protocols import protocol_info, protocol_rank

__all__ = ["SAME_FUNCTION", "Num", "Column", "Row", "LeaderTable", "data_label", "safe_stem",
           "build_tables", "markdown_rows", "to_markdown", "to_latex", "latex_escape", "markdown_escape", "write_cells_csv"]

#: Marks the protocol of a row whose one cell also answers other protocols (an entry without a
#: purifier attacks the same function under each); the table's notes explain it.
SAME_FUNCTION = "†"
#: one line per evaluation-quality flag, for the table notes
FLAG_TEXT = {**FLAG_HELP, **CROSS_CELL_HELP}
_THREAT_TEX = {"linf": r"$\ell_\infty$", "l2": r"$\ell_2$"}
_THREAT_TEXT = {"linf": "ℓ∞", "l2": "ℓ2"}
_THREAT_ORDER = {"linf": 0, "l2": 1}
_OPTIONAL = (("defense_version", "Version"), ("classifier", "Classifier"), ("preset", "Preset"),
             ("defense_options", "Options"), ("variant", "Variant"), ("data", "Data"))


@dataclass(frozen=True)
class Num:
    """A number with an optional spread; ``percent`` values are fractions shown times 100."""

    mean: float | None
    std: float | None = None
    percent: bool = True
    digits: int = 2

    def __post_init__(self) -> None:  # NaN (pandas' missing value) means missing
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or math.isnan(value)):
                object.__setattr__(self, name, None)

    @property
    def sort_value(self) -> float | None:
        """The value as displayed (percent for accuracies), for sorting."""
        return None if self.mean is None else self.mean * (100 if self.percent else 1)

    def text(self, pm: str = " ± ", missing: str = "–") -> str:
        """``45.00``, ``45.00 ± 1.41`` or ``missing``."""
        if self.mean is None:
            return missing
        scale = 100 if self.percent else 1
        out = f"{self.mean * scale:.{self.digits}f}"
        return out + (f"{pm}{self.std * scale:.{self.digits}f}" if self.std is not None else "")


@dataclass(frozen=True)
class Column:
    """A table column: ``key`` into :attr:`Row.values`, a header, and how to align/style it."""

    key: str
    title: str
    numeric: bool = False
    reported: bool = False


@dataclass
class Row:
    """One table row: display values by column key, plus the protocol, provenance, footnote and the
    cell's protocol note (``config["protocol_note"]``: the other protocols it answers)."""

    values: dict[str, Any]
    protocol: str
    provenance: list[dict[str, Any]] = field(default_factory=list)
    ref: int | None = None
    note: str = ""


@dataclass
class LeaderTable:
    """One leaderboard table (dataset, threat, eps) in a format-neutral form."""

    dataset: str
    threat: str
    eps_text: str
    eps: float
    columns: list[Column]
    rows: list[Row]
    notes: list[str]  # "Classifier: wrn-28-10"-style facts common to every row
    references: list[tuple[int, str]]  # footnotes for the reported columns
    protocols: list[str]  # protocols used in the table, in tier order
    entries: dict[str, dict[str, Any]]  # defense name -> its entry (paper, citation, ...)
    stem: str = ""
    variants: bool = False  # rows on colour-shifted / corrupted variants of the test set (not clean data)

    @property
    def title(self) -> str:
        """``cifar10 · ℓ∞ · ε = 8/255`` (``· dataset variants`` for a table of variant rows)."""
        return (f"{self.dataset} · {_THREAT_TEXT.get(self.threat, self.threat)} · ε = {self.eps_text}"
                + (" · dataset variants" if self.variants else ""))


def _row_values(rec: Mapping[str, Any], metrics: list[str], ref: int | None) -> dict[str, Any]:
    rep = rec.get("reported") or {}
    values: dict[str, Any] = {
        "defense": rec["defense"], "defense_version": rec["defense_version"],
        "classifier": rec["classifier"], "preset": rec["preset"], "variant": rec["variant"],
        "defense_options": rec["defense_options"],
        "data": data_label(rec["data_source"]), "protocol": rec["protocol"],
        "attack": rec["attack_label"] or rec["attack"],
        "clean": Num(rec["clean_mean"], rec["clean_std"]),
        "robust": Num(rec["robust_mean"], rec["robust_std"]),
        "best": Num(rec["best_mean"], rec["best_std"]),
        "flags": ", ".join(rec.get("flags") or []),
        "avg": Num(rec["avg_mean"], rec["avg_std"]), "n": int(rec["n"]), "seeds": int(rec["seeds"]),
        "reported_clean": Num(rep.get("clean") if rep else None, percent=False),
        "reported_robust": Num(rep.get("robust") if rep else None, percent=False),
        "ref": f"[{ref}]" if ref else "",
    }
    for name in metrics:
        mean, std = rec["metric_stats"].get(name, (None, None))
        values[f"metric:{name}"] = Num(mean, std, percent=False, digits=3)
    return values


def _one_table(group: pd.DataFrame) -> LeaderTable:
    first = group.iloc[0]
    group = group.assign(
        _p=group["protocol"].map(lambda p: protocol_rank(p)[0]), _d=group["defense"].str.lower(),
        data=group["data_source"].map(data_label),
        classifier=[f"{c} (own network)" if own else c
                    for c, own in zip(group["classifier"], group["own_network"])])
    group = group.sort_values(["_d", "defense_version", "classifier", "preset", "defense_options",
                               "variant", "data", "_p", "protocol", "attack_label", "n"], kind="stable")
    columns, notes = [Column("defense", "Defense")], []
    for key, title in _OPTIONAL:
        distinct = sorted(set(group[key].astype(str)))
        if key == "defense_version":  # a column only if some defense has several versions
            distinct = distinct[:1 + (group.groupby("defense")[key].nunique() > 1).any()]
        if len(distinct) > 1 or (key == "data" and "JPEG copy" in distinct):
            columns.append(Column(key, title))
        elif key == "data":
            notes.append(f"Data: {first['data_source']}")
        elif key != "defense_version" and distinct[0]:
            notes.append(f"{title}: {distinct[0]}")
    sources = sorted({s.split(VARIANT_SEPARATOR)[0] for s in group["data_source"].astype(str)})
    if any(data_label(s) == "JPEG copy" for s in sources):
        notes.append("JPEG copy: evaluated on a JPEG-compressed copy of the test set (" +
                     "; ".join(s for s in sources if data_label(s) == "JPEG copy") +
                     "), not directly comparable with results on the original images")
    notes += [f"{SAME_FUNCTION} {note}" for note in sorted(set(group["protocol_note"]) - {""})]
    notes.append("Best-known: a sample counts as robust only if it survived every attack stored for its "
                 "setting (same defense, network, data, eps, protocol, n and seed); Robust: this row's attack")
    columns += [Column("protocol", "Protocol"), Column("attack", "Attack"),
                Column("clean", "Clean", True), Column("best", "Best-known", True),
                Column("robust", "Robust", True),
                Column("avg", "Avg", True), Column("n", "n", True), Column("seeds", "Seeds", True)]
    flagged = sorted({f for flags in group["flags"] for f in flags})
    if flagged:
        columns.append(Column("flags", "Flags"))
        notes.append("Flags (the row's evaluation is potentially unreliable): " +
                     "; ".join(f"{name}: {FLAG_TEXT.get(name, 'see harness docs')}" for name in flagged))
    metrics = sorted({m for stats in group["metric_stats"] for m in stats})
    columns += [Column(f"metric:{m}", m, True) for m in metrics]
    refs: dict[str, int] = {}
    for rep in group["reported"]:
        if rep:
            refs.setdefault(_reference_text(rep), len(refs) + 1)
    if refs:
        columns += [Column("reported_clean", "Reported clean", True, True),
                    Column("reported_robust", "Reported robust", True, True),
                    Column("ref", "Source", False, True)]
    rows = []
    for rec in group.to_dict("records"):
        ref = refs[_reference_text(rec["reported"])] if rec["reported"] else None
        rows.append(Row(_row_values(rec, metrics, ref), rec["protocol"], rec["provenance"], ref,
                        rec["protocol_note"]))
    protocols = sorted(set(group["protocol"]), key=protocol_rank)
    entries = {rec["defense"]: rec["entry"] for rec in group.to_dict("records")}
    return LeaderTable(
        dataset=str(first["dataset"]), threat=str(first["threat"]), eps_text=str(first["eps_text"]),
        eps=float(first["eps"]), columns=columns, rows=rows, notes=notes,
        references=[(i, text) for text, i in refs.items()], protocols=protocols, entries=entries,
        variants=bool((group["variant"] != "clean").any()))


def _reference_text(rep: Mapping[str, Any]) -> str:
    extra = [f"{k}: {rep[k]}" for k in ("attack", "classifier") if rep.get(k)]
    return str(rep.get("source") or "(no source given)") + (f" (reported {'; '.join(extra)})"
                                                            if extra else "")


def build_tables(aggregated: pd.DataFrame) -> list[LeaderTable]:
    """One :class:`LeaderTable` per (dataset, threat, eps_text) on the clean test data, and one more
    per (dataset, threat, eps_text) for the rows on dataset variants; ordered by dataset, threat, eps."""
    if aggregated.empty:
        return []
    tables, stems = [], set()
    on_variant = (aggregated["variant"] != "clean").rename("on_variant")
    for _, group in aggregated.groupby(["dataset", "threat", "eps_text", on_variant], sort=False):
        tables.append(_one_table(group))
    tables.sort(key=lambda t: (t.dataset, _THREAT_ORDER.get(t.threat, 9), t.threat, t.eps, t.eps_text,
                               t.variants))
    for table in tables:
        base = safe_stem(table.dataset, table.threat, table.eps_text, *(["variants"] if table.variants else []))
        stem, i = base, 2
        while stem in stems:  # two eps texts that sanitise alike
            stem, i = f"{base}_{i}", i + 1
        stems.add(stem)
        table.stem = stem
    return tables


def markdown_escape(text: Any) -> str:
    """Make plugin text safe inside a Markdown table cell (pipes, HTML tags, newlines)."""
    out = re.sub(r"([\\|<>`*_\[\]])", r"\\\1", str(text))
    return re.sub(r"\s*\n\s*", " ", out)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "[": "{[}", "]": "{]}", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
                  SAME_FUNCTION: r"\textdagger{}"}


def latex_escape(text: Any) -> str:
    """Escape LaTeX special characters in plugin-supplied text."""
    out = re.sub(rf"[\\&%$#_{{}}~^<>\[\]{SAME_FUNCTION}]", lambda m: _LATEX_SPECIAL[m.group()], str(text))
    return out.replace("\n", " ")


def _display_frame(table: LeaderTable, escape: Callable[[Any], str], pm: str,
                   missing: str) -> pd.DataFrame:
    """The table's cells as display strings (plugin text through ``escape``), headed by titles."""
    def text(key: str, row: Row) -> str:
        value = row.values.get(key)
        if isinstance(value, Num):
            return value.text(pm, missing)
        if key == "protocol" and row.note:
            return escape(f"{value} {SAME_FUNCTION}")
        return str(value) if key == "ref" else escape("" if value is None else value)
    return pd.DataFrame([[text(c.key, r) for c in table.columns] for r in table.rows],
                        columns=[escape(c.title) for c in table.columns])


def _legend_lines(table: LeaderTable) -> list[tuple[str, str, str]]:
    return [(p, *protocol_info(p)) for p in table.protocols]


def markdown_rows(table: LeaderTable, limit: int, keys: Sequence[str]) -> str:
    """The pipe table of the first ``limit`` rows, with the columns among ``keys`` that the table has."""
    columns = [c for c in table.columns if c.key in keys]
    frame = _display_frame(replace(table, columns=columns, rows=table.rows[:limit]), markdown_escape, " ± ", "–")
    return frame.to_markdown(index=False, disable_numparse=True,
                             colalign=tuple("right" if c.numeric else "left" for c in columns))


def to_markdown(table: LeaderTable) -> str:
    """The table as a Markdown section: heading, notes, the pipe table (tabulate), legend, footnotes."""
    frame = _display_frame(table, markdown_escape, " ± ", "–")
    align = tuple("right" if c.numeric else "left" for c in table.columns)
    body = frame.to_markdown(index=False, disable_numparse=True, colalign=align)
    lines = [f"## {markdown_escape(table.title)}", ""]
    if table.notes:
        lines += [" · ".join(markdown_escape(n) for n in table.notes), ""]
    lines += [body, "", "Clean / Best-known / Robust / Avg: measured accuracy in percent (Avg = (Clean + Robust) / 2);"
              " `a ± b` is the mean ± sample std over the seeds counted in *Seeds*."]
    if table.references:
        lines.append("*Reported* columns are numbers printed in the papers, not measured by harness.")
    lines += ["", "Protocols:"]
    lines += [f"- `{markdown_escape(p)}` ({markdown_escape(label)}): {markdown_escape(desc)}"
              for p, label, desc in _legend_lines(table)]
    if table.references:
        lines += ["", "Reported sources:"]
        lines += [f"- [{i}] {markdown_escape(text)}" for i, text in table.references]
    papers = [(name, e) for name, e in sorted(table.entries.items()) if e.get("paper") or e.get("citation")]
    if papers:
        lines += ["", "Papers:"]
    for name, entry in papers:
        cite = f" ({markdown_escape(entry['citation'])})" if entry.get("citation") else ""
        lines.append(f"- {markdown_escape(name)}: {markdown_escape(entry.get('paper') or '')}{cite}")
    return "\n".join(lines) + "\n"


def to_latex(table: LeaderTable) -> str:
    """The table as a LaTeX ``table`` float (booktabs rules via ``Styler.to_latex``; needs booktabs)."""
    frame = _display_frame(table, latex_escape, r" $\pm$ ", "--")
    threat = _THREAT_TEX.get(table.threat, latex_escape(table.threat))
    caption = (f"{latex_escape(table.dataset)}, {threat}, $\\epsilon = {latex_escape(table.eps_text)}$. "
               "Accuracy in \\%; mean $\\pm$ std over seeds.")
    if table.notes:
        caption += " " + "; ".join(latex_escape(n) for n in table.notes) + "."
    latex = frame.style.hide(axis="index").to_latex(
        hrules=True, caption=caption, label=f"tab:{table.stem or safe_stem(table.dataset)}",
        position="htbp", position_float="centering",
        column_format="".join("r" if c.numeric else "l" for c in table.columns))
    notes = [f"\\texttt{{{latex_escape(p)}}}: {latex_escape(label)}. {latex_escape(desc)}"
             for p, label, desc in _legend_lines(table)]
    notes += [f"{{[{i}]}} Reported in the paper, not measured: {latex_escape(text)}"
              for i, text in table.references]
    if notes:
        block = "\\par\\smallskip\n{\\footnotesize\n" + "\\par\n".join(notes) + "\\par}\n"
        latex = latex.replace("\\end{tabular}\n", "\\end{tabular}\n" + block, 1)
    return latex


def write_cells_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Every cell (any status) with all raw columns and run provenance, one row per cell.

    Dict-valued columns (``config``, ``metrics``, ``run_packages``) are written as sorted JSON.
    """
    out = frame.copy()
    for col in ("config", "metrics", "run_packages"):
        if col in out:
            out[col] = out[col].map(lambda v: canonical_json(v) if isinstance(v, (dict, list)) else v)
    sort = [c for c in ("dataset", "threat", "eps", "defense", "protocol", "attack_label", "seed",
                        "cell_id") if c in out]
    if not out.empty:
        out = out.sort_values(sort, kind="stable")
    path.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(path, index=False)
    return path

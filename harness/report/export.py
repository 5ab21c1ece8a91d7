"""``harness export``: the results store in other formats.

* ``robustbench``: a RobustBench-style model card (``model_info/<dataset>/<Linf|L2>/<name>.json``, the
  fields of RobustBench's ``model_info``: link, name, authors, additional_data, number_forward_passes,
  dataset, venue, architecture, eps, clean_acc, reported, autoattack_acc, external, footnote, unreliable;
  accuracies as text in percent with two decimals) for every deterministic entry (RobustBench's models are
  deterministic) and each dataset, threat and eps it has finished cells for. A card reads the cells of
  one setting: the clean test split (no variant, no transferred purifier), the first protocol of
  :data:`PROTOCOL_PREFERENCE` the entry has (white-box AutoAttack on the whole model is RobustBench's
  number), then the largest n, the smallest seed and the first network. ``autoattack_acc`` is the
  AutoAttack standard cell's robust accuracy, ``external`` the best-known accuracy over every attack of
  the setting when it is lower, and ``unreliable`` is set by any evaluation-quality flag of those cells
  or by a non-adaptive setting. The eps of RobustBench's leaderboards (:data:`STANDARD_EPS`) names the
  card ``<entry>.json``; another eps adds ``_eps-<eps>`` to the name. A ``harness`` field keeps where the
  numbers came from (cell keys, protocol, n, network, data source, weights).
* ``csv`` / ``parquet``: ``cells.<ext>`` (one row per cell: its columns, its run's provenance, its
  weights' fingerprint and its config as JSON) and ``samples.<ext>`` (one row per sample: the cell key,
  the sample's fields, and whether it was correct and robust), for analysis in pandas. Parquet needs
  pyarrow (``pip install 'harness[parquet]'``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from harness.analysis.best_known import best_known
from harness.core.errors import UsageError
from harness.results.queries import cells_with_runs
from harness.results.schema import Cell, SampleResult

__all__ = ["EXPORT_FORMATS", "STANDARD_EPS", "PROTOCOL_PREFERENCE", "export", "export_tables",
           "export_robustbench", "cell_rows", "sample_rows"]

EXPORT_FORMATS = ("robustbench", "csv", "parquet")
#: RobustBench's threat-model folder names
THREAT_FOLDERS = {"linf": "Linf", "l2": "L2"}
#: the eps of RobustBench's leaderboards, by (dataset, threat); others get their eps in the file name
STANDARD_EPS = {("cifar10", "linf"): "8/255", ("cifar100", "linf"): "8/255", ("imagenet", "linf"): "4/255",
                ("cifar10", "l2"): "0.5", ("cifar100", "l2"): "0.5"}
#: which protocol a card reads, in order: RobustBench's numbers attack the whole model with exact gradients
PROTOCOL_PREFERENCE = ("adaptive", "bpda", "adaptive-eot", "non-adaptive")
_RUN_FIELDS = ("git_commit", "git_dirty", "harness_version", "device", "host")


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


# -- csv / parquet ---------------------------------------------------------------------------------------
def cell_rows(engine: Engine) -> pd.DataFrame:
    """Every cell (any status) with its run's provenance, its weights' fingerprint and its config as JSON."""
    names = [attr.key for attr in Cell.__mapper__.column_attrs if attr.key != "config"]
    rows = []
    for cell, run in cells_with_runs(engine):
        row = {name: getattr(cell, name) for name in names}
        row["metrics"] = json.dumps(cell.metrics or {}, sort_keys=True, default=str)
        weights = (cell.config or {}).get("weights_fingerprint") or {}
        row["weights_fingerprint"] = weights.get("defense", "") if isinstance(weights, Mapping) else str(weights)
        for name in _RUN_FIELDS:
            row[f"run_{name}"] = getattr(run, name) if run is not None else None
        row["config"] = json.dumps(cell.config, sort_keys=True, default=str)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*names, "weights_fingerprint", *(f"run_{n}" for n in _RUN_FIELDS), "config"])


def sample_rows(engine: Engine) -> pd.DataFrame:
    """Every per-sample row, with its cell's key and whether it was correct (clean) and robust."""
    with Session(engine) as session:
        rows = session.execute(select(Cell.key, SampleResult.sample_index, SampleResult.label,
                                      SampleResult.clean_pred, SampleResult.adv_pred, SampleResult.perturbation,
                                      SampleResult.extra)
                               .join(SampleResult, SampleResult.cell_id == Cell.id)
                               .order_by(Cell.id, SampleResult.sample_index)).all()
    frame = pd.DataFrame([tuple(r) for r in rows], columns=["cell_key", "sample_index", "label", "clean_pred",
                                                             "adv_pred", "perturbation", "extra"])
    frame["correct"] = frame["clean_pred"] == frame["label"]
    frame["robust"] = frame["correct"] & (frame["adv_pred"] == frame["label"])
    frame["extra"] = [None if e is None else json.dumps(e, sort_keys=True) for e in frame["extra"]]
    return frame


def export_tables(engine: Engine, out: str | Path, fmt: str) -> list[Path]:
    """Write ``cells.<fmt>`` and ``samples.<fmt>`` (csv or parquet) into ``out``."""
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("parquet export needs pyarrow: pip install 'harness[parquet]' (or pyarrow), or use "
                             "--format csv") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, frame in (("cells", cell_rows(engine)), ("samples", sample_rows(engine))):
        path = out / f"{name}.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, engine="pyarrow", index=False)
        paths.append(path)
    return paths


# -- robustbench ------------------------------------------------------------------------------------------
def _authors(citation: str) -> str:
    """The authors of a citation such as ``Chen & Lu 2025, arXiv:...``: the text before the year."""
    head = citation.split(",")[0].strip()
    words = head.split()
    if words and words[-1].isdigit():
        words = words[:-1]
    return " ".join(words)


def _link(entry: Mapping[str, Any]) -> str:
    meta = entry.get("metadata") or {}
    if meta.get("code_url"):
        return str(meta["code_url"])
    for part in str(entry.get("citation", "")).replace(",", " ").split():
        if part.lower().startswith("arxiv:"):
            return f"https://arxiv.org/abs/{part.split(':', 1)[1]}"
    return ""


def _card_name(entry: str, dataset: str, threat: str, eps_text: str) -> str:
    if STANDARD_EPS.get((dataset, threat)) == eps_text:
        return entry
    return f"{entry}_eps-{eps_text.replace('/', '_')}"


def _setting_choice(cells: list[tuple[Cell, Any]]) -> list[tuple[Cell, Any]]:
    """The cells of the one setting a card reads (see the module docstring)."""
    protocols = {c.protocol for c, _ in cells}
    protocol = next(p for p in (*PROTOCOL_PREFERENCE, *sorted(protocols)) if p in protocols)
    mine = [(c, r) for c, r in cells if c.protocol == protocol]
    n = max(c.n for c, _ in mine)
    mine = [(c, r) for c, r in mine if c.n == n]
    seed = min(c.seed for c, _ in mine)
    mine = [(c, r) for c, r in mine if c.seed == seed]
    network = sorted(c.classifier for c, _ in mine)[0]
    return [(c, r) for c, r in mine if c.classifier == network]


def _card(entry_name: str, chosen: list[tuple[Cell, Any]], best: Mapping[str, Any]) -> dict[str, Any]:
    first = chosen[0][0]
    entry = first.config.get("entry") or {}
    meta = entry.get("metadata") or {}
    autoattack = [c for c, _ in chosen if c.attack == "autoattack" and c.attack_label.lower().startswith("autoattack")
                  and (c.config.get("attack") or {}).get("version", "standard") == "standard"]
    known = best.get(first.key)
    best_acc = known.accuracy if known is not None else min(c.robust_acc for c, _ in chosen)
    aa_acc = autoattack[0].robust_acc if autoattack else None
    reported = [r for r in entry.get("reported") or [] if r.get("dataset") == first.dataset
                and r.get("threat") == first.threat and r.get("eps") == first.eps_text and r.get("robust") is not None]
    flags = sorted({f.get("flag", f.get("name", "")) if isinstance(f, Mapping) else str(f)
                    for c, _ in chosen for f in (c.metrics or {}).get("flags", [])})
    extra = meta.get("extra_data")
    venue = " ".join(str(v) for v in (meta.get("venue"), meta.get("year")) if v)
    notes = [f"Measured by harness under the {first.protocol} protocol on n = {first.n} test images "
             f"(seed {first.seed}), network {first.classifier}."]
    if first.data_source:
        notes.append(f"Data: {first.data_source}.")
    if first.protocol == "non-adaptive":
        notes.append("Non-adaptive evaluation only: an upper bound.")
    if flags:
        notes.append(f"Evaluation-quality flags: {', '.join(flags)}.")
    if extra:
        notes.append(f"Uses {extra.get('size')} {extra.get('kind')} images in training"
                     + (f" ({extra['source']})." if extra.get("source") else "."))
    card: dict[str, Any] = {
        "link": _link(entry), "name": entry.get("paper") or entry_name, "authors": _authors(entry.get("citation", "")),
        "additional_data": bool(extra), "number_forward_passes": int(meta.get("nfe") or 1),
        "dataset": first.dataset, "venue": venue or "N/A", "architecture": meta.get("architecture") or "",
        "eps": first.eps_text, "clean_acc": _percent(first.clean_acc),
        "reported": f"{float(reported[0]['robust']):.2f}" if reported else "",
        "autoattack_acc": _percent(aa_acc) if aa_acc is not None else _percent(best_acc),
        "footnote": " ".join(notes), "unreliable": bool(flags) or first.protocol == "non-adaptive",
    }
    if aa_acc is None or best_acc < aa_acc:
        card["external"] = _percent(best_acc)
    card["harness"] = {
        "entry": entry_name, "version": first.defense_version, "preset": first.preset, "protocol": first.protocol,
        "n": first.n, "seed": first.seed, "network": first.classifier, "dataset_fingerprint": first.dataset_fingerprint,
        "attacks": {c.key: c.attack_label for c, _ in chosen},
        "weights_fingerprint": (first.config.get("weights_fingerprint") or {}).get("defense", "")
        if isinstance(first.config.get("weights_fingerprint"), Mapping) else "",
        "git_commits": sorted({r.git_commit for _, r in chosen if r is not None and r.git_commit}),
    }
    return card


def export_robustbench(engine: Engine, out: str | Path) -> list[Path]:
    """Write a model card per deterministic entry, dataset, threat and eps (see the module docstring)."""
    rows = [(c, r) for c, r in cells_with_runs(engine) if c.status == "done" and c.variant == "clean"
            and not (c.config.get("defense") or {}).get("train_dataset")
            and not (c.config.get("entry") or {}).get("stochastic", False)]
    groups: dict[tuple[str, str, str, str], list[tuple[Cell, Any]]] = defaultdict(list)
    for cell, run in rows:
        groups[cell.defense, cell.dataset, cell.threat, cell.eps_text].append((cell, run))
    best = _best_known(engine, [c for c, _ in rows])
    out = Path(out)
    paths = []
    for (entry, dataset, threat, eps_text), cells in sorted(groups.items()):
        folder = out / "model_info" / dataset / THREAT_FOLDERS.get(threat, threat)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_card_name(entry, dataset, threat, eps_text)}.json"
        card = _card(entry, _setting_choice(cells), best)
        path.write_text(json.dumps(card, indent=2) + "\n")
        paths.append(path)
    return paths


def _best_known(engine: Engine, cells: Iterable[Cell]) -> dict[str, Any]:
    cells = list(cells)
    keys = [c.key for c in cells]
    if not keys:
        return {}
    with Session(engine) as session:
        samples = session.execute(select(Cell.key, SampleResult.sample_index, SampleResult.label,
                                         SampleResult.clean_pred, SampleResult.adv_pred)
                                  .join(SampleResult, SampleResult.cell_id == Cell.id)
                                  .where(Cell.key.in_(keys))).all()
    return best_known([{"cell_key": c.key, "config": c.config, "attack_label": c.attack_label} for c in cells],
                      [tuple(s) for s in samples])


def export(engine: Engine, fmt: str, out: str | Path) -> list[Path]:
    """Export the store in ``fmt`` (one of :data:`EXPORT_FORMATS`) into the folder ``out``."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORT_FORMATS)}")
    if fmt == "robustbench":
        return export_robustbench(engine, out)
    return export_tables(engine, out, fmt)

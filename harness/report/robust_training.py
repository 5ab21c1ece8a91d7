"""The robust-training comparison of the DRA paper (PAPERS.md §3): one row per classifier entry that harness
trained itself (AT, TRADES, DM-AT, TRADES+DRA, DM-AT+DRA, ...) beside the undefended classifier, with the
clean and AutoAttack-standard robust accuracy of its adaptive cells, its representation measures
(effective rank, SAE loss) and its training cost. Training seeds (distinct trained networks) are
aggregated as mean ± sample std; every number comes from stored cells or analysis rows.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from harness.analysis.representations import ANALYSIS_KIND as REPRESENTATIONS_KIND
from harness.report.html import ExtraSection, frame_html
from harness.report.tables import markdown_escape
from harness.results.queries import load_analyses

__all__ = ["AUTOATTACK_LABEL", "representation_rows", "robust_training_table", "robust_training_section", "robust_training_markdown"]

AUTOATTACK_LABEL = "AutoAttack (standard)"

TEXT = ("Classifiers trained by harness's robust-training recipes, evaluated like every defense: clean and "
        "AutoAttack-standard robust accuracy under the adaptive protocol (exact gradients; these networks are "
        "deterministic) on the first n test images of the fixed evaluation permutation; mean ± sample std over "
        "training seeds. Effective rank and SAE loss: the Representations analysis of the same networks. Cost: "
        "training seconds on the machine that trained it, optimiser steps and epochs of the recipe. DRA "
        "settings are reconstructed (the paper's exact choices could not be read).")


def representation_rows(engine: Engine) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The stored Representations analysis rows, as (config, result) pairs, oldest first."""
    with Session(engine) as session:
        return [(dict(a.config), dict(a.result)) for a in load_analyses(session, REPRESENTATIONS_KIND)]


def _pm(values: Sequence[Any], scale: float = 1.0, digits: int = 2) -> str:
    series = pd.Series([float(v) * scale for v in values if v is not None], dtype=float).dropna()
    if series.empty:
        return "–"
    if len(series) == 1:
        return f"{series.iloc[0]:.{digits}f}"
    return f"{series.mean():.{digits}f} ± {series.std(ddof=1):.{digits}f}"


def _text_or_dash(value: Any) -> str:
    """``value`` if it is non-empty text, else "–" (pandas turns a missing preset into NaN)."""
    return value if isinstance(value, str) and value else "–"


def _network(config: Mapping[str, Any]) -> tuple[int | None, dict[str, Any], dict[str, Any]]:
    """(training seed, recipe, training record) of a cell's harness-trained network, or (None, {}, {})."""
    provenance = config.get("classifier_provenance")
    if not isinstance(provenance, dict) or "artifact_key" not in provenance:
        return None, {}, {}
    recipe = provenance.get("recipe") if isinstance(provenance.get("recipe"), dict) else {}
    training = provenance.get("training") if isinstance(provenance.get("training"), dict) else {}
    return recipe.get("seed"), recipe, training


def _rank_rows(rows: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> dict[tuple[str, str, Any], Mapping]:
    """Representation results by (defense, dataset, training seed), the newest row winning."""
    return {(str(c.get("defense")), str(c.get("dataset")), c.get("train_seed")): r for c, r in rows}


def robust_training_table(cells: pd.DataFrame,
                          representation_rows: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]] = ()
                          ) -> pd.DataFrame:
    """The comparison table from done ``cells`` (:func:`harness.report.frame.cells_frame`): one row per
    (dataset, threat, eps, n, defense) among the trained classifier entries (and the undefended baseline
    of the same settings), sorted by mean robust accuracy."""
    if cells.empty:
        return pd.DataFrame()
    aa = cells[(cells["status"] == "done") & (cells["attack_label"] == AUTOATTACK_LABEL)
               & (cells["protocol"] == "adaptive") & (cells["variant"] == "clean")]
    if aa.empty:
        return pd.DataFrame()
    ranks = _rank_rows(representation_rows)
    records = []
    for row in aa.itertuples():
        config = row.config if isinstance(row.config, dict) else {}
        seed, recipe, training = _network(config)
        is_baseline = row.defense == "none"
        if seed is None and not is_baseline:
            continue  # a purifier, or a classifier harness did not train: not part of this comparison
        rep = ranks.get((row.defense, row.dataset, seed if seed is not None else 0)) or {}
        records.append({"dataset": row.dataset, "threat": row.threat, "eps": row.eps_text, "n": row.n,
                        "defense": row.defense, "network": row.classifier, "seed": seed,
                        "clean": row.clean_acc, "robust": row.robust_acc,
                        "rank": rep.get("effective_rank"), "sae": rep.get("sae_loss"),
                        "seconds": training.get("seconds"), "steps": training.get("steps"),
                        "epochs": training.get("epochs"), "synthetic": training.get("synthetic_images"),
                        "objective": training.get("objective", "standard" if is_baseline else ""),
                        "preset": recipe.get("preset")})
    if not records or all(r["defense"] == "none" for r in records):
        return pd.DataFrame()
    frame = pd.DataFrame(records).drop_duplicates(["dataset", "threat", "eps", "n", "defense", "network"], keep="last")
    out = []
    for (dataset, threat, eps, n, defense), group in frame.groupby(["dataset", "threat", "eps", "n", "defense"]):
        first = group.iloc[0]
        steps = sorted({int(s) for s in group["steps"].dropna()})
        epochs = sorted({int(e) for e in group["epochs"].dropna()})
        out.append({"dataset": dataset, "threat": f"{threat} {eps}", "n": int(n), "entry": defense,
                    "preset": _text_or_dash(first["preset"]), "objective": _text_or_dash(first["objective"]),
                    "training seeds": len(group), "clean %": _pm(group["clean"], 100),
                    "AutoAttack %": _pm(group["robust"], 100), "effective rank": _pm(group["rank"], digits=1),
                    "SAE loss": _pm(group["sae"], digits=4),
                    "synthetic images": int(first["synthetic"]) if pd.notna(first["synthetic"]) else 0,
                    "epochs": ",".join(map(str, epochs)) or "–", "steps": ",".join(map(str, steps)) or "–",
                    "train minutes": _pm(group["seconds"], 1 / 60, 1),
                    "_order": -float(group["robust"].mean())})
    table = pd.DataFrame(out).sort_values(["dataset", "threat", "n", "_order", "entry"], kind="stable")
    return table.drop(columns="_order").reset_index(drop=True)


def robust_training_section(cells: pd.DataFrame, representation_rows=()) -> list[ExtraSection]:
    table = robust_training_table(cells, representation_rows)
    if table.empty:
        return []
    return [ExtraSection(title="Robust training", html=frame_html(table), text=TEXT)]


def robust_training_markdown(cells: pd.DataFrame, representation_rows=()) -> str:
    """The table as Markdown (empty when there is nothing to compare)."""
    table = robust_training_table(cells, representation_rows)
    if table.empty:
        return ""
    head = "| " + " | ".join(markdown_escape(c) for c in table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    body = ["| " + " | ".join(markdown_escape(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(["## Robust training", "", TEXT, "", head, rule, *body, ""])

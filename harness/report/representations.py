"""The DRA paper's representation analyses in the report (PAPERS.md §3): the "Representations" table
(effective rank and top-k SAE loss per entry, :mod:`harness.analysis.representations`) and the
"Diffusion-feature probe" table (:mod:`harness.analysis.diffusion_probe`), from the analysis rows of
the results DB. Every value shown comes through pandas' escaping (HTML) or :func:`markdown_escape`."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from harness.analysis.diffusion_probe import ANALYSIS_KIND as PROBE_KIND
from harness.analysis.representations import ANALYSIS_KIND as REPRESENTATIONS_KIND
from harness.report.frame import canonical_json
from harness.report.html import ExtraSection, frame_html
from harness.report.tables import markdown_escape
from harness.results.queries import load_analyses

__all__ = ["representations_table", "probe_table", "representation_sections", "representations_markdown"]

_REP_SETTING = ["defense", "preset", "options", "dataset", "n", "train_n", "sae"]


def _rows(engine: Engine, kind: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    with Session(engine) as session:
        return [(dict(a.config), dict(a.result)) for a in load_analyses(session, kind)]


def _pm(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    series = pd.Series([float(v) * scale for v in values], dtype=float).dropna()
    if series.empty:
        return "–"
    if len(series) == 1:
        return f"{series.iloc[0]:.{digits}f}"
    return f"{series.mean():.{digits}f} ± {series.std(ddof=1):.{digits}f}"


def representations_table(rows: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> pd.DataFrame:
    """One line per entry setting (its training seeds aggregated: mean ± sample std): clean accuracy on
    the subset (%), effective rank, SAE normalised MSE, dead latents (%) and the settings."""
    if not rows:
        return pd.DataFrame()
    records = []
    for config, result in rows:
        sae = config.get("sae") or {}
        records.append({
            "defense": str(config.get("defense", "")), "preset": str(config.get("preset") or "–"),
            "options": canonical_json(config.get("options") or {}), "dataset": str(config.get("dataset", "")),
            "n": str(config.get("n", "?")), "train_n": str(config.get("train_n", "?")),
            "sae": f"{sae.get('latents', '?')} latents, k={sae.get('k', '?')}, {sae.get('steps', '?')} steps",
            "train_seed": config.get("train_seed"), "clean": result.get("clean_acc"),
            "rank": result.get("effective_rank"), "dim": result.get("feature_dim"),
            "sae_loss": result.get("sae_loss"), "dead": result.get("dead_latents")})
    frame = pd.DataFrame(records)
    out = []
    for key, group in frame.groupby(_REP_SETTING, sort=True, dropna=False):
        setting = dict(zip(_REP_SETTING, key))
        out.append({"entry": setting["defense"], "preset": setting["preset"],
                    "options": "" if setting["options"] == "{}" else setting["options"],
                    "dataset": setting["dataset"], "seeds": len(group),
                    "clean %": _pm(group["clean"], 100), "feature dim": int(group["dim"].iloc[0]),
                    "effective rank": _pm(group["rank"], digits=1), "SAE loss": _pm(group["sae_loss"], digits=4),
                    "dead latents %": _pm(group["dead"], 100, 1),
                    "settings": f"test n={setting['n']}, SAE on {setting['train_n']} train images, "
                                f"{setting['sae']}"})
    return pd.DataFrame(out)


def _features_text(features: Mapping[str, Any]) -> str:
    if "ddpm" in features:
        noise = features.get("noise") or {}
        return (f"DDPM {features.get('ddpm_preset')} ({str(features.get('ddpm'))[:10]}), t={features.get('timestep')}, "
                f"block {features.get('block')}, {features.get('pool')} pool, noise seed {noise.get('seed')}")
    return f"{features.get('classifier')} {features.get('layer', '')}".strip()


def probe_table(rows: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> pd.DataFrame:
    """One line per probe record: representation, features, attack, clean / robust / train accuracy (%)."""
    if not rows:
        return pd.DataFrame()
    out = []
    for config, result in rows:
        probe = config.get("probe") or {}
        out.append({"representation": str(config.get("representation", "")),
                    "features": _features_text(config.get("features") or {}),
                    "dataset": str(config.get("dataset", "")), "feature dim": result.get("feature_dim"),
                    "attack": f"{result.get('attack_label', '')} {config.get('threat', '')} {config.get('eps', '')}",
                    "clean %": _pm([result.get("clean_acc")], 100), "robust %": _pm([result.get("robust_acc")], 100),
                    "probe train %": _pm([result.get("train_acc")], 100),
                    "settings": f"test n={config.get('n')}, probe on {config.get('train_n')} train images, "
                                f"{probe.get('steps')} Adam steps (lr {probe.get('lr')}, "
                                f"wd {probe.get('weight_decay')}), seed {config.get('seed')}"})
    return pd.DataFrame(out).sort_values(["dataset", "attack", "representation"], kind="stable")


_REP_TEXT = ("Penultimate features of each entry's network on the first n test images of the fixed evaluation "
             "permutation. Effective rank: exp of the entropy of the normalised singular values of the centred "
             "feature matrix (Roy & Vetterli 2007). SAE loss: normalised MSE (1 = the training mean) of a top-k "
             "sparse autoencoder (Makhzani & Frey 2013; Gao et al. 2024) trained on the entry's features of "
             "training images, the same dictionary size and k for every entry; lower means more disentangled "
             "(DRA paper). Training seeds: mean ± sample std.")
_PROBE_TEXT = ("Linear probes (logistic regression) on frozen features, attacked end to end with exact gradients: "
               "through the DDPM's UNet with the noise pinned per image (diffusion), or through the standard "
               "classifier (classifier). Only correctly classified points are attacked. The DRA paper's claim: "
               "diffusion features are partially robust.")


def representation_sections(engine: Engine) -> list[ExtraSection]:
    """The two HTML sections, each only when its analysis has rows."""
    sections = []
    reps = representations_table(_rows(engine, REPRESENTATIONS_KIND))
    if not reps.empty:
        sections.append(ExtraSection(title="Representations", html=frame_html(reps), text=_REP_TEXT))
    probes = probe_table(_rows(engine, PROBE_KIND))
    if not probes.empty:
        sections.append(ExtraSection(title="Diffusion-feature probe", html=frame_html(probes), text=_PROBE_TEXT))
    return sections


def _markdown(title: str, text: str, frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(markdown_escape(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(markdown_escape("" if v is None else v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([f"## {title}", "", text, "", head, rule, *body, ""])


def representations_markdown(engine: Engine) -> str:
    """Both tables as Markdown (empty when neither analysis has rows)."""
    parts = []
    reps = representations_table(_rows(engine, REPRESENTATIONS_KIND))
    if not reps.empty:
        parts.append(_markdown("Representations", _REP_TEXT, reps))
    probes = probe_table(_rows(engine, PROBE_KIND))
    if not probes.empty:
        parts.append(_markdown("Diffusion-feature probe", _PROBE_TEXT, probes))
    return "\n".join(parts)

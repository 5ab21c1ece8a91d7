"""The MAEP paper's analyses as report pieces (Chen & Lu, arXiv:2501.16904): image quality (Table 1),
accuracy drop under colour shift (Tables 5-6), accuracy vs colour-corruption severity (Fig. 6) and
purifier transfer across datasets (Tables 7-9).

Every function takes finished cells as :func:`harness.report.frame.cells_frame` gives them (one row
per cell; ``variant`` names the dataset variant, ``metric_*`` the per-cell image-quality metrics) and
averages over seeds. Accuracies are shown in percent. :func:`quality_sections` writes the figures and
returns the sections for :func:`harness.report.write_reports`' ``extra_sections``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection, Sequence

import pandas as pd

from harness.report.figures import plt, save_figure
from harness.report.html import ExtraSection, frame_html

__all__ = ["QUALITY_METRICS", "quality_table", "color_shift_table", "corruption_frame", "transfer_table",
           "plot_color_shift", "plot_corruptions", "quality_sections"]

#: Cell metrics of Table 1, in column order (written by :func:`harness.evaluation.metrics.merge_quality`).
QUALITY_METRICS = ("psnr_clean", "ssim_clean", "psnr_adv", "ssim_adv")
#: A transferred purifier (trained on another dataset) is a setting of its own in every table.
_SETTING = ["defense", "preset", "classifier", "train_dataset", "dataset", "protocol", "attack_label", "eps_text"]
_ACC = {"clean_acc": "clean", "robust_acc": "robust", "avg_acc": "avg"}
_CURVE = ["defense", "preset", "dataset", "protocol", "attack_label", "eps_text"]  # one line per setting


def _done(cells: pd.DataFrame) -> pd.DataFrame:
    """The finished cells, with ``train_dataset``: the dataset the purifier was trained on."""
    done = cells[cells["status"] == "done"] if "status" in cells else cells
    return done.assign(train_dataset=[_train_dataset(c, d) for c, d in zip(done["config"], done["dataset"])]
                       if len(done) else pd.Series(dtype=str))


def _mean(frame: pd.DataFrame, keys: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Mean of ``values`` over seeds (and any other column not in ``keys``)."""
    present = [v for v in values if v in frame]
    if frame.empty or not present:
        return pd.DataFrame(columns=list(keys) + list(values))
    out = frame.groupby(list(keys), dropna=False, sort=True)[present].mean().reset_index()
    return out.reindex(columns=list(keys) + list(values))


def _percent(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    frame = frame.copy()
    for col in columns:
        frame[col] = (frame[col].astype(float) * 100).round(2)
    return frame


def quality_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Table 1: mean PSNR (dB, capped at 100) and SSIM of purified vs clean images, for clean and for
    adversarial inputs, per defense and setting (clean data only)."""
    done = _done(cells)
    done = done[done["variant"] == "clean"]
    metrics = [f"metric_{m}" for m in QUALITY_METRICS]
    table = _mean(done, _SETTING, metrics).dropna(subset=[m for m in metrics if m in done], how="all")
    table = table.rename(columns={f"metric_{m}": m for m in QUALITY_METRICS})
    return table.round({"psnr_clean": 2, "psnr_adv": 2, "ssim_clean": 3, "ssim_adv": 3})


def color_shift_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Tables 5-6: accuracy on clean vs colour-shifted (``colored``) data, and the drop in points."""
    done = _done(cells)
    acc = list(_ACC)
    base = _mean(done[done["variant"] == "clean"], _SETTING, acc)
    shifted = _mean(done[done["variant"] == "colored"], _SETTING, acc)
    table = base.merge(shifted, on=_SETTING, suffixes=("", "_colored"))
    for col in acc:
        table[f"{_ACC[col]}_drop"] = table[col] - table[f"{col}_colored"]
    columns = [c for col in acc for c in (col, f"{col}_colored", f"{_ACC[col]}_drop")]
    return _percent(table[_SETTING + columns], columns)


def corruption_frame(cells: pd.DataFrame) -> pd.DataFrame:
    """Fig. 6 data: accuracy per defense, corruption and severity (severity 0 = the clean data)."""
    done = _done(cells)
    corrupt = done[done["variant"].astype(str).str.startswith("corrupt:")]
    parts = corrupt["variant"].str.split(":", expand=True) if len(corrupt) else None
    corrupt = corrupt.assign(corruption=parts[1], severity=parts[2].astype(int)) if parts is not None \
        else corrupt.assign(corruption=pd.Series(dtype=str), severity=pd.Series(dtype=int))
    # severity 0 is the clean data, for exactly the settings (and corruptions) that have corrupted cells
    clean = done[done["variant"] == "clean"].drop(columns=["corruption", "severity"], errors="ignore")
    curves = corrupt[_SETTING + ["corruption"]].drop_duplicates()
    rows = [corrupt, clean.merge(curves, on=_SETTING).assign(severity=0)]
    keys = _SETTING + ["corruption", "severity"]
    return _percent(_mean(pd.concat(rows, ignore_index=True), keys, list(_ACC)), list(_ACC))


def _train_dataset(config: object, dataset: str) -> str:
    defense = config.get("defense") if isinstance(config, dict) else None
    return (defense or {}).get("train_dataset") or dataset


def transfer_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Tables 7-9: accuracy of each defense by (purifier training dataset, test dataset)."""
    done = _done(cells)
    return _percent(_mean(done[done["variant"] == "clean"], _SETTING, list(_ACC)), list(_ACC))


def plot_color_shift(table: pd.DataFrame, path: Path) -> Path:
    """Grouped bars of clean accuracy on clean vs colour-shifted data, one pair per defense setting
    (clean accuracy does not depend on the attack protocol: one row per setting is drawn)."""
    table = table.drop_duplicates(subset=["defense", "preset", "classifier", "dataset"])
    several = table["dataset"].nunique() > 1
    labels = [f"{d}\n{ds}" if several else d for d, ds in zip(table["defense"], table["dataset"])]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(labels) + 1.5), 3.2))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], table["clean_acc"], 0.4, label="clean data")
    ax.bar([x + 0.2 for x in xs], table["clean_acc_colored"], 0.4, label="colour-shifted data")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("clean accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy under Reinhard colour shift")
    return save_figure(fig, path)


def plot_corruptions(frame: pd.DataFrame, path: Path) -> Path:
    """One panel per corruption: accuracy vs severity, a solid (clean) / dashed (robust) line per defense."""
    names = sorted(set(frame["corruption"]))
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.4 * max(1, len(names)), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        part = frame[frame["corruption"] == name]
        for keys, line in part.groupby(_CURVE, sort=True):
            setting = dict(zip(_CURVE, keys))
            label = f"{setting['defense']} ({setting['protocol']}" + "".join(
                f", {setting[k]}" for k in ("dataset", "eps_text", "attack_label") if frame[k].nunique() > 1) + ")"
            line = line.sort_values("severity")
            drawn = ax.plot(line["severity"], line["clean_acc"], marker="o", label=label)
            ax.plot(line["severity"], line["robust_acc"], linestyle="--", color=drawn[0].get_color())
        ax.set_title(name)
        ax.set_xlabel("severity")
        ax.set_ylim(0, 100)
        ax.set_xticks(range(6))
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, path)


def quality_sections(cells: pd.DataFrame, out_dir: Path, *,
                     baselines: Collection[str] = ()) -> list[ExtraSection]:
    """The sections that have data, with figures written under ``out_dir/figures``; the transfer table
    shows the ``baselines`` (defense names, see :func:`harness.report.frame.baseline_defenses`) too."""
    sections = []
    quality = quality_table(cells)
    if len(quality):
        sections.append(ExtraSection(
            "Image quality of purified images (MAEP paper, Table 1)", html=frame_html(quality),
            text="PSNR (dB, identical images capped at 100) and SSIM of the purified image against the "
                 "clean image, for clean inputs and for the adversarial inputs of the cell."))
    shift = color_shift_table(cells)
    if len(shift):
        figure = plot_color_shift(shift, Path(out_dir) / "figures" / "color_shift.png")
        sections.append(ExtraSection(
            "Accuracy drop under colour shift (MAEP paper, Tables 5-6)", html=frame_html(shift),
            text="Accuracy (%) on the clean test data and on its Reinhard colour-transferred variant "
                 "('colored'); drop = clean - colored, in points.",
            images=(figure.relative_to(out_dir).as_posix(),), caption="Clean accuracy, clean vs colored data."))
    corruptions = corruption_frame(cells)
    if len(corruptions):
        figure = plot_corruptions(corruptions, Path(out_dir) / "figures" / "corruptions.png")
        sections.append(ExtraSection(
            "Colour corruptions (MAEP paper, Fig. 6)", text="Accuracy (%) vs ImageNet-C / CIFAR-10-C "
            "severity (0 = clean data).", images=(figure.relative_to(out_dir).as_posix(),),
            caption="Clean (solid) and robust (dashed) accuracy per defense and protocol."))
    transfer = transfer_table(cells)
    moved = transfer["train_dataset"] != transfer["dataset"]
    if moved.any():  # the transferred purifiers, their in-domain rows and the baselines
        shown = transfer[transfer["defense"].isin(set(transfer.loc[moved, "defense"]) | set(baselines))]
        sections.append(ExtraSection("Defense transfer across datasets (MAEP paper, Tables 7-9)",
                                     html=frame_html(shown), text="Accuracy (%) of purifiers trained on "
                                     "one dataset (train_dataset) and evaluated with a classifier on another "
                                     "(dataset), beside the same purifiers in-domain and the baselines "
                                     "(e.g. the undefended classifier)."))
    return sections

"""RobustBench model-zoo checkpoints of the DM-AT / robust-training family as classifier entries.

RobustBench (Croce et al., "RobustBench: a standardized adversarial robustness benchmark", NeurIPS 2021
Datasets and Benchmarks, arXiv:2010.09670) publishes checkpoints of robustly trained classifiers with
their clean and AutoAttack-standard accuracies. The entries here load such a checkpoint through harness's
``robustbench:<name>`` loader (:func:`harness.api.robustbench_classifier`, the same code as
``--classifier robustbench:<name>``), from ``<artifact root>/robustbench/<dataset>/Linf/<name>.pt``;
``load_model`` downloads the file there only when it is missing. They are evaluated like every entry of
kind classifier (no base classifier), keyed by a fingerprint of the loaded network, and carry the
RobustBench leaderboard's numbers as reported (tier ``adaptive``: AutoAttack on the bare model).

* ``rb-standard``: RobustBench's ``Standard`` WRN-28-10, trained without any defense (the baseline).
* ``rb-wang2023-wrn-28-10`` / ``rb-wang2023-wrn-70-16``: Wang et al., "Better Diffusion Models Further
  Improve Adversarial Training", ICML 2023 (DM-AT: TRADES on real and EDM-generated images), the
  published checkpoints of the recipe harness's ``trades-syn`` entry reproduces at CPU size.
* ``rb-rebuffi2021-wrn-28-10``: Rebuffi et al., "Fixing Data Augmentation to Improve Adversarial
  Robustness", arXiv:2103.01946 (adversarial training with 1M DDPM-generated images and CutMix), the
  first of the family.

Every number is copied from RobustBench's ``model_info/<dataset>/Linf/<name>.json`` (``clean_acc`` and
``autoattack_acc``), named in its ``source``. The robustbench package is an optional extra
(``pip install 'harness[robustbench]'``); without it, building an entry is a one-line UsageError, and
listing the entries imports neither robustbench nor torchvision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from harness.api import (Defense, DefenseEntry, ExtraData, Kind, Metadata, Reported, Role, UsageError,
                         robustbench_classifier)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from harness.api import BuildContext

__all__ = ["RB_STANDARD", "RB_WANG2023_WRN_28_10", "RB_WANG2023_WRN_70_16", "RB_REBUFFI2021_WRN_28_10",
           "ROBUSTBENCH_MODELS", "robustbench_entry", "THREAT", "MODEL_DIR"]

#: the RobustBench leaderboard these checkpoints come from (harness's threat name)
THREAT = "linf"
#: the folder under the artifact root that is robustbench's ``model_dir`` (as for ``robustbench:<name>``)
MODEL_DIR = "robustbench"
_RB_CITATION = "Croce et al., NeurIPS 2021 Datasets and Benchmarks, arXiv:2010.09670"
_RB_URL = "https://github.com/RobustBench/robustbench"
#: each entry of this module and the RobustBench model name it loads
ROBUSTBENCH_MODELS: dict[str, str] = {
    "rb-standard": "Standard",
    "rb-wang2023-wrn-28-10": "Wang2023Better_WRN-28-10",
    "rb-wang2023-wrn-70-16": "Wang2023Better_WRN-70-16",
    "rb-rebuffi2021-wrn-28-10": "Rebuffi2021Fixing_28_10_cutmix_ddpm",
}


def _leaderboard(dataset: str, model: str, clean: float, autoattack: float, architecture: str) -> Reported:
    """RobustBench's clean and AutoAttack-standard accuracy of ``model`` (Linf, eps 8/255), with the
    leaderboard file they were copied from as the source."""
    return Reported(dataset, THREAT, "8/255", "AutoAttack standard", clean, autoattack,
                    f"RobustBench leaderboard (Croce et al. 2021), model_info/{dataset}/Linf/{model}.json",
                    architecture, tier="adaptive")


def _builder(model: str) -> Callable[["BuildContext"], Defense]:
    """The ``build`` of an entry: RobustBench's ``load_model(model)`` for the run's dataset, Linf."""

    def build(ctx: "BuildContext") -> Defense:
        if ctx.artifacts is None:
            raise UsageError(f"defense {ctx.entry_name!r} needs an artifact cache (robustbench's model_dir)")
        loaded = robustbench_classifier(model, ctx.dataset, THREAT, ctx.artifacts.root / MODEL_DIR)
        return Defense(loaded.model)

    build.__qualname__ = f"build[{model}]"
    return build


def robustbench_entry(name: str, model: str, *, paper: str, citation: str, architecture: str, parameters: int,
                      reported: tuple[Reported, ...], datasets: tuple[str, ...] = ("cifar10",),
                      extra_data: ExtraData | None = None, venue: str = "", year: int | None = None,
                      code_url: str = _RB_URL, role: Role = Role.DEFENSE, description: str = "") -> DefenseEntry:
    """A classifier entry for the RobustBench Linf checkpoint ``model`` on ``datasets`` (each must have a
    checkpoint of that name in RobustBench's zoo). ``parameters`` is the CIFAR-10 network's count."""
    for item in reported:
        if item.dataset not in datasets:
            raise ValueError(f"defense {name!r}: a reported number for {item.dataset!r}, which it does not support")
    return DefenseEntry(
        name=name, version="1", kind=Kind.CLASSIFIER, paper=paper, citation=citation, build=_builder(model),
        datasets=datasets, role=role, reported=reported,
        metadata=Metadata(architecture=architecture, parameters=parameters, extra_data=extra_data, nfe=1,
                          venue=venue, year=year, code_url=code_url),
        description=(f"RobustBench checkpoint {model} (Linf), loaded with robustbench.utils.load_model from "
                     f"<artifact root>/{MODEL_DIR}. " + description).strip())


RB_STANDARD = robustbench_entry(
    "rb-standard", ROBUSTBENCH_MODELS["rb-standard"],
    paper="RobustBench: a standardized adversarial robustness benchmark (its standardly trained model)",
    citation=_RB_CITATION, architecture="WRN-28-10", parameters=36_479_194, venue="NeurIPS 2021 D&B", year=2021,
    role=Role.BASELINE,
    reported=(_leaderboard("cifar10", "Standard", 94.78, 0.0, "WRN-28-10"),),
    description="Standard (non-adversarial) training: the undefended reference of the RobustBench rows.")

RB_WANG2023_WRN_28_10 = robustbench_entry(
    "rb-wang2023-wrn-28-10", ROBUSTBENCH_MODELS["rb-wang2023-wrn-28-10"],
    paper="Better Diffusion Models Further Improve Adversarial Training",
    citation="Wang, Pang, Du, Lin, Liu & Yan, ICML 2023, arXiv:2302.04638", architecture="WRN-28-10",
    parameters=36_479_194, datasets=("cifar10", "cifar100"), venue="ICML", year=2023,
    code_url="https://github.com/wzekai99/DM-Improves-AT",
    extra_data=ExtraData("synthetic", 20_000_000, "EDM (Karras et al. 2022), class-conditional; 50M on CIFAR-100"),
    reported=(_leaderboard("cifar10", "Wang2023Better_WRN-28-10", 92.44, 67.31, "WRN-28-10"),
              _leaderboard("cifar100", "Wang2023Better_WRN-28-10", 72.58, 38.83, "WRN-28-10")),
    description="DM-AT: TRADES on real and generated images (the paper-scale trades-syn).")

RB_WANG2023_WRN_70_16 = robustbench_entry(
    "rb-wang2023-wrn-70-16", ROBUSTBENCH_MODELS["rb-wang2023-wrn-70-16"],
    paper="Better Diffusion Models Further Improve Adversarial Training",
    citation="Wang, Pang, Du, Lin, Liu & Yan, ICML 2023, arXiv:2302.04638", architecture="WRN-70-16",
    parameters=266_796_506, datasets=("cifar10", "cifar100"), venue="ICML", year=2023,
    code_url="https://github.com/wzekai99/DM-Improves-AT",
    extra_data=ExtraData("synthetic", 50_000_000, "EDM (Karras et al. 2022), class-conditional"),
    reported=(_leaderboard("cifar10", "Wang2023Better_WRN-70-16", 93.25, 70.69, "WRN-70-16"),
              _leaderboard("cifar100", "Wang2023Better_WRN-70-16", 75.22, 42.67, "WRN-70-16")),
    description="DM-AT at WRN-70-16 (267M parameters: slow on a CPU).")

RB_REBUFFI2021_WRN_28_10 = robustbench_entry(
    "rb-rebuffi2021-wrn-28-10", ROBUSTBENCH_MODELS["rb-rebuffi2021-wrn-28-10"],
    paper="Fixing Data Augmentation to Improve Adversarial Robustness",
    citation="Rebuffi, Gowal, Calian, Stimberg, Wiles & Mann, arXiv:2103.01946, 2021", architecture="WRN-28-10",
    parameters=36_479_194, datasets=("cifar10", "cifar100"), venue="arXiv", year=2021,
    extra_data=ExtraData("synthetic", 1_000_000, "DDPM (Ho et al. 2020), unconditional, pseudo-labelled"),
    reported=(_leaderboard("cifar10", "Rebuffi2021Fixing_28_10_cutmix_ddpm", 87.33, 60.75, "WRN-28-10"),
              _leaderboard("cifar100", "Rebuffi2021Fixing_28_10_cutmix_ddpm", 62.41, 32.06, "WRN-28-10")),
    description="Adversarial training with DDPM-generated images and CutMix, weight averaging.")

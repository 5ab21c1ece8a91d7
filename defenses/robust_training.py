"""Robust classifiers trained by harness: PGD-AT, TRADES, DM-AT (TRADES on real + diffusion-generated
data) and DRA (a projection head aligning the classifier's features with a frozen diffusion model's).

* ``pgd-at``: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
* ``trades``: Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019.
* ``trades-syn``: Wang et al., "Better Diffusion Models Further Improve Adversarial Training", ICML 2023:
  TRADES (beta 5), 70% generated images per batch, label smoothing 0.1, weight EMA.
* ``trades-dra`` and ``trades-syn-dra``: Huang, Chen & Lin, "Expanding the Role of Diffusion Models for
  Robust Classifier Training", arXiv:2602.19931: ``L_TRADES + lambda * (1 - cos(h(u), z))``.

The DRA settings are **reconstructed**: the paper's exact choices could not be read here. Defaults, as in
the project's paper notes: ``z`` the pooled mid-block output of the frozen (unconditional) DDPM on the
clean image noised to a fixed timestep with pinned per-image noise; ``u`` the penultimate features of the
adversarial input; a 2-layer MLP head; lambda 0.5. ``z`` is computed once per training image and cached
(a UNet pass per batch is what dominates on a CPU); it is the feature of the un-augmented image, whereas
the classifier sees the flipped and cropped one.

Presets: ``tiny`` (tests), ``small`` (2 CPU cores, the comparison study: every entry trains with the same
epochs, steps and batch size) and ``paper`` (WRN-28-10 at the settings of Wang et al. 2023 / the DRA
paper, far beyond a CPU). An epoch is ``50,000 / batch_size`` steps whether or not synthetic images are
mixed in, so the entries of one preset cost the same number of optimiser steps.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Mapping

import torch

from harness.api import (Defense, DefenseEntry, ExtraData, Kind, Metadata, Reported, Split, build_classifier, count_parameters,
                         cached_features, synthetic_set, train_robust_classifier)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from harness.api import BuildContext, TrainContext

__all__ = ["PGD_AT", "TRADES", "TRADES_SYN", "TRADES_DRA", "TRADES_SYN_DRA", "robust_presets"]

_FAST_INNER = {"eps": 8 / 255, "steps": 1, "step_size": None, "random_start": True}  # FGSM-RS: 1.25 eps
_PGD10_INNER = {"eps": 8 / 255, "steps": 10, "step_size": 2 / 255, "random_start": True}

_CLASSIFIER = {
    "tiny": {"arch": "convnet-tiny", "epochs": 3, "batch_size": 32, "lr": 0.1, "lr_start": 0.1, "warmup": 0.2,
             "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "label_smoothing": 0.1, "augment": True,
             "crop_pad": 4, "bf16": False, "channels_last": True, "whiten_stem": False, "whiten_bias_epochs": 0,
             "subset": 256, "eval_batch_size": 500, "inner": _FAST_INNER, "beta": 5.0, "ema": 0.9},
    # sized for 2 CPU cores, where AutoAttack on 512 images of ten robust models must fit as well: FGSM-RS
    # inner steps, the 76k-parameter conv net, 5 epochs on all 50k images, forward passes under CPU
    # bfloat16 autocast (~2x faster with AMX; the trained weights are float32)
    "small": {"arch": "convnet-tiny", "epochs": 5, "batch_size": 256, "lr": 0.2, "lr_start": 0.1, "warmup": 0.2,
              "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "label_smoothing": 0.1, "augment": True,
              "crop_pad": 4, "bf16": True, "channels_last": True, "whiten_stem": False, "whiten_bias_epochs": 0,
              "subset": None, "eval_batch_size": 1000, "inner": _FAST_INNER, "beta": 5.0, "ema": 0.99},
    # Wang et al. 2023 (WRN-28-10): batch 512, lr 0.2 (here one-cycle, theirs cosine), 10-step PGD 2/255,
    # TRADES beta 5, label smoothing 0.1, EMA 0.999; 400 epochs of 50k-image passes
    "paper": {"arch": "wrn-28-10", "epochs": 400, "batch_size": 512, "lr": 0.2, "lr_start": 0.0, "warmup": 0.025,
              "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "label_smoothing": 0.1, "augment": True,
              "crop_pad": 4, "bf16": False, "channels_last": True, "whiten_stem": False, "whiten_bias_epochs": 0,
              "subset": None, "eval_batch_size": 500, "inner": _PGD10_INNER, "beta": 5.0, "ema": 0.999},
}
_SYNTHETIC = {  # the generated set: class-conditional DDPM of the preset, DDIM sampling, guidance
    "tiny": {"n": 64, "preset": "tiny", "sampler": "ddim:steps=2", "guidance": 1.0, "seed": 0},
    "small": {"n": 3000, "preset": "small", "sampler": "ddim:steps=10", "guidance": 1.0, "seed": 0},
    "paper": {"n": 1_000_000, "preset": "paper", "sampler": "ddim:steps=20", "guidance": 1.0, "seed": 0},
}
_DIFFUSION = {  # the frozen feature DDPM of DRA (the unconditional one the diffusion purifiers share)
    "tiny": {"preset": "tiny", "timestep": 10, "block": "mid", "pool": "avg", "seed": 0},
    "small": {"preset": "small", "timestep": 100, "block": "mid", "pool": "avg", "seed": 0},
    "paper": {"preset": "paper", "timestep": 100, "block": "mid", "pool": "avg", "seed": 0},
}
# the small preset's network, for the model card (the paper preset trains a WRN-28-10, 36.5M parameters)
_SMALL_PARAMETERS = count_parameters(build_classifier(_CLASSIFIER["small"]["arch"], 10))
_ALIGN = {"lambda": 0.5, "layer": "penultimate", "head_hidden": 512, "head_layers": 2, "input": "adversarial"}


def robust_presets(objective: str, synthetic: bool, dra: bool) -> dict[str, dict[str, Any]]:
    """The tiny/small/paper presets of one recipe: the classifier config plus the synthetic-data and
    diffusion-feature settings (present, and hashed, even where the recipe does not use them)."""
    presets = {}
    for name in ("tiny", "small", "paper"):
        classifier = {**copy.deepcopy(_CLASSIFIER[name]), "objective": objective,
                      "synthetic_ratio": 0.7 if synthetic else 0.0,
                      "align": {**_ALIGN, "lambda": _ALIGN["lambda"] if dra else 0.0}}
        if objective == "pgd-at":
            classifier["ema"] = 0.0  # plain Madry PGD-AT
        presets[name] = {"classifier": classifier,
                         "synthetic": {**_SYNTHETIC[name], "n": _SYNTHETIC[name]["n"] if synthetic else 0},
                         "diffusion": dict(_DIFFUSION[name])}
    return presets


def _train(ctx: "TrainContext") -> dict[str, torch.Tensor]:
    config: Mapping[str, Any] = ctx.config
    split = ctx.train_split
    syn_cfg, dif_cfg, cls_cfg = config["synthetic"], config["diffusion"], config["classifier"]
    synthetic = None
    if cls_cfg["synthetic_ratio"] > 0:
        synthetic = synthetic_set(ctx.artifacts, split.info.name, int(syn_cfg["n"]), sampler=syn_cfg["sampler"],
                                  guidance=float(syn_cfg["guidance"]), seed=int(syn_cfg["seed"]),
                                  preset=syn_cfg["preset"], data_root=ctx.data_root, progress=ctx.progress)
    targets = None
    if cls_cfg["align"]["lambda"] > 0:
        def features(of: Split) -> torch.Tensor:
            return cached_features(ctx.artifacts, of, preset=dif_cfg["preset"], timestep=int(dif_cfg["timestep"]),
                                   block=dif_cfg["block"], pool=dif_cfg["pool"], seed=int(dif_cfg["seed"]),
                                   progress=ctx.progress)

        synthetic_split = None
        if synthetic is not None:
            synthetic_split = Split(split.info, "synthetic", synthetic.images, synthetic.labels,
                                    synthetic.fingerprint, f"synthetic set {synthetic.fingerprint}")
        targets = (features(split), features(synthetic_split) if synthetic_split is not None else None)
    model, metrics = train_robust_classifier(split, cls_cfg, seed=ctx.seed, progress=ctx.progress,
                                             synthetic=synthetic, align_targets=targets, checkpoint=ctx.checkpoint)
    ctx.metrics.update(metrics)
    if synthetic is not None:
        ctx.metrics["synthetic"] = {"fingerprint": synthetic.fingerprint, **synthetic.provenance}
    return model.state_dict()


def _build(ctx: "BuildContext") -> Defense:
    info = ctx.dataset
    network = build_classifier(ctx.config["classifier"]["arch"], info.num_classes, info.image_shape,
                               mean=info.mean, std=info.std)
    network.load_state_dict(ctx.weights())
    return Defense(network.eval())


def _entry(name: str, objective: str, synthetic: bool, dra: bool, paper: str, citation: str, venue: str,
           year: int, description: str, reported: tuple[Reported, ...] = ()) -> DefenseEntry:
    small = robust_presets(objective, synthetic, dra)["small"]
    extra = (ExtraData("synthetic", small["synthetic"]["n"], "harness class-conditional DDPM (small preset), "
                       f"{small['synthetic']['sampler']}") if synthetic else None)
    return DefenseEntry(
        name=name, version="1", kind=Kind.CLASSIFIER, paper=paper, citation=citation, build=_build, train=_train,
        presets=robust_presets(objective, synthetic, dra),
        metadata=Metadata(architecture=_CLASSIFIER["small"]["arch"], parameters=_SMALL_PARAMETERS, nfe=1, extra_data=extra,
                          venue=venue, year=year),
        reported=reported, description=description)


_WANG_REPORTED = (Reported("cifar10", "linf", "8/255", "AutoAttack standard", 92.44, 67.31,
                           "Wang et al. 2023 (ICML), 20M generated images; via the DRA paper", "WRN-28-10",
                           tier="adaptive"),)

PGD_AT = _entry(
    "pgd-at", "pgd-at", False, False, "Towards Deep Learning Models Resistant to Adversarial Attacks",
    "Madry et al., ICLR 2018, arXiv:1706.06083", "ICLR", 2018,
    "PGD adversarial training; the small preset uses the FGSM-RS inner step of Wong et al. (ICLR 2020).")
TRADES = _entry(
    "trades", "trades", False, False, "Theoretically Principled Trade-off between Robustness and Accuracy",
    "Zhang et al., ICML 2019, arXiv:1901.08573", "ICML", 2019,
    "TRADES (beta 5, label smoothing 0.1, weight EMA) on the real training set.")
TRADES_SYN = _entry(
    "trades-syn", "trades", True, False, "Better Diffusion Models Further Improve Adversarial Training",
    "Wang et al., ICML 2023, arXiv:2302.04638", "ICML", 2023,
    "DM-AT: TRADES on real + class-conditional-DDPM images, 70% generated per batch.", _WANG_REPORTED)
TRADES_DRA = _entry(
    "trades-dra", "trades", False, True, "Expanding the Role of Diffusion Models for Robust Classifier Training",
    "Huang, Chen & Lin, arXiv 2026, arXiv:2602.19931", "arXiv", 2026,
    "TRADES + DRA alignment of penultimate features with frozen DDPM mid-block features (settings "
    "reconstructed: the paper's exact choices could not be read).")
TRADES_SYN_DRA = _entry(
    "trades-syn-dra", "trades", True, True, "Expanding the Role of Diffusion Models for Robust Classifier Training",
    "Huang, Chen & Lin, arXiv 2026, arXiv:2602.19931", "arXiv", 2026,
    "DM-AT + DRA: TRADES on real + generated images with the DRA alignment term (settings reconstructed: "
    "the paper's exact choices could not be read).")

""""Diffusion features are partially robust" (the DRA paper, PAPERS.md §3): a linear probe on the frozen
features of a DDPM, attacked end to end, against a linear probe on a standard classifier's
penultimate features attacked the same way.

Each representation maps an image in [0, 1] to a feature vector: the diffusion one is
:class:`~harness.toolkit.diffusion.features.DiffusionFeatures` (noised to timestep t with noise pinned per
image index, one UNet block, pooled), the classifier one ``network.features(x)``. A multinomial logistic
regression (standardised features, full-batch Adam, L2 penalty) is fitted on the features of
``train_n`` training images (the diffusion ones cached as an artifact, :func:`cached_features`); the
composite ``probe(features(x))`` is then attacked with exact gradients (through the UNet, the noise of
each test image fixed by its index, so the target is a deterministic function) on the test images a cell
uses. As in AutoAttack, only correctly classified points are attacked. One row per representation and
attack (kind ``diffusion-probe``) goes to the results DB; ``harness report`` renders them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from sqlalchemy.engine import Engine
from torch import nn
from tqdm import tqdm

from harness.analysis.networks import stored_run
from harness.analysis.representations import network_features
from harness.attacks.base import Target, perturbation_norm
from harness.attacks.catalog import build_attack
from harness.classifiers.architectures import penultimate_features
from harness.classifiers.sources import DEFAULT_CLASSIFIER, resolve_classifier
from harness.core.artifacts import ArtifactCache
from harness.core.errors import UsageError
from harness.core.passes import gradient_free
from harness.core.threat import Epsilon, ThreatModel
from harness.data import Split, dataset_info, load_split
from harness.evaluation.runner import evaluation_subset
from harness.results.queries import save_analysis
from harness.toolkit.diffusion.features import (NOISE_NAMESPACE, POOLS, DiffusionFeatures, cached_features,
                                                load_feature_ddpm, pinned_noise)
from harness.toolkit.diffusion.model import ddpm_preset

__all__ = ["ANALYSIS_KIND", "REPRESENTATIONS", "LinearProbe", "train_probe", "ProbeRequest",
           "probe_robustness", "check_probe_request", "run_diffusion_probe"]

ANALYSIS_KIND = "diffusion-probe"
REPRESENTATIONS = ("diffusion", "classifier")

FeatureFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, dataset indices) -> features


class LinearProbe(nn.Module):
    """Logistic regression on standardised features: ``W (f - mean) / std + b``."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, classes: int):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clamp_min(1e-6).clone())
        self.linear = nn.Linear(len(mean), classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


def train_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, *, steps: int = 300,
                lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0) -> LinearProbe:
    """A :class:`LinearProbe` fitted by full-batch Adam on cross-entropy + ``weight_decay * ||W||^2``."""
    if steps < 1 or not lr > 0 or weight_decay < 0:
        raise UsageError(f"probe training needs steps >= 1, lr > 0 and weight decay >= 0 "
                         f"(got {steps}, {lr}, {weight_decay})")
    features = features.float()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = LinearProbe(features.mean(dim=0), features.std(dim=0), classes)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(probe(features), labels) + weight_decay * probe.linear.weight.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe.eval().requires_grad_(False)


def probe_robustness(features: FeatureFn, probe: LinearProbe, split: Split, indices: torch.Tensor,
                     attack_spec: Mapping[str, Any], threat: ThreatModel, seed: int, batch_size: int = 64,
                     progress: bool = False) -> dict[str, Any]:
    """Clean and robust accuracy of ``probe(features(x))`` on ``split``'s images at ``indices`` under
    ``attack_spec`` with exact gradients; only clean-correct points are attacked."""
    attack = build_attack(attack_spec, threat)
    target = Target(lambda x, idx: probe(features(x, idx)), index_dependent=True)
    clean_ok, robust_ok, worst = [], [], 0.0
    started = time.time()
    for lo in tqdm(range(0, len(indices), batch_size), desc=f"attack {attack.label()}", disable=not progress,
                   unit="batch"):
        idx = indices[lo:lo + batch_size]
        x, y = split.float_images(idx), split.labels[idx]
        with gradient_free(target):
            ok = target(x, idx).argmax(1) == y
        survived = ok.clone()
        rows = ok.nonzero().squeeze(1)
        if len(rows):
            x_adv = attack.perturb(target, x[rows], y[rows], idx[rows], seed)
            worst = max(worst, float(perturbation_norm(x_adv, x[rows], threat.norm).max()))
            with gradient_free(target):
                survived[rows] = target(x_adv, idx[rows]).argmax(1) == y[rows]
        clean_ok.append(ok)
        robust_ok.append(survived)
    clean, robust = torch.cat(clean_ok).float(), torch.cat(robust_ok).float()
    if worst > threat.eps.value * (1 + 1e-4) + 1e-6:
        raise RuntimeError(f"the attack left the threat model ({threat.norm} {worst:.5f} > {threat.eps.value:.5f})")
    return {"clean_acc": float(clean.mean()), "robust_acc": float(robust.mean()), "attack": attack.params(),
            "attack_label": attack.label(), "max_perturbation": worst, "seconds": round(time.time() - started, 1)}


@dataclass(frozen=True)
class ProbeRequest:
    """The probe analysis: the DDPM features (``ddpm_preset``, ``timestep``, ``block``, ``pool``, noise
    ``noise_seed``), the comparison classifier, the probe's training images (``train_n``, the first of one
    fixed permutation of the training split) and budget, the test images (``n``, those a cell uses) and
    the attacks."""

    dataset: str = "cifar10"
    classifier: str = DEFAULT_CLASSIFIER
    ddpm_preset: str = "small"
    timestep: int = 100
    block: str = "mid"
    pool: str = "avg"
    noise_seed: int = 0
    n: int = 512
    train_n: int = 10000
    probe_steps: int = 300
    probe_lr: float = 0.05
    weight_decay: float = 1e-4
    threat: str = "linf"
    eps: str = "8/255"
    attacks: Sequence[Mapping[str, Any]] = (dict(name="pgd", steps=20),)
    representations: Sequence[str] = REPRESENTATIONS
    seed: int = 0
    batch_size: int = 64
    feature_batch_size: int = 256
    data_root: str | None = None
    artifact_root: str | None = None
    progress: bool = True


def _preset_blocks(preset: str) -> list[str]:
    """The block names of DDPM preset ``preset`` (as :func:`feature_blocks` names them on its UNet)."""
    unet = ddpm_preset(preset)["unet"]
    downs = len(unet["down_block_types"])
    return [f"down.{k}" for k in range(downs)] + ["mid"] + [f"up.{k}" for k in range(len(unet["up_block_types"]))]


def check_probe_request(request: ProbeRequest) -> ThreatModel:
    """Every input of ``request`` checked before anything is loaded (a one-line :class:`UsageError`
    naming the valid choices); returns the threat model."""
    threat = ThreatModel(request.threat, Epsilon.parse(request.eps))
    dataset_info(request.dataset)
    blocks = _preset_blocks(request.ddpm_preset)
    if request.block not in blocks:
        raise UsageError(f"unknown UNet block {request.block!r}; valid: {', '.join(blocks)}")
    steps = ddpm_preset(request.ddpm_preset)["schedule"]["num_train_timesteps"]
    if not 0 <= request.timestep < steps:
        raise UsageError(f"timestep {request.timestep} is outside the schedule's 0..{steps - 1}")
    _check(request, threat)
    return threat


def _check(request: ProbeRequest, threat: ThreatModel) -> None:
    unknown = sorted(set(request.representations) - set(REPRESENTATIONS))
    if unknown or not request.representations:
        raise UsageError(f"unknown representation {', '.join(unknown) or '(none given)'}; "
                         f"valid: {', '.join(REPRESENTATIONS)}")
    if request.pool not in POOLS:
        raise UsageError(f"unknown pooling {request.pool!r}; valid: {', '.join(POOLS)}")
    if request.n < 1 or request.train_n < 2:
        raise UsageError(f"--n must be >= 1 and --train-n >= 2 (got {request.n} and {request.train_n})")
    if not request.attacks:
        raise UsageError("name at least one attack")
    for spec in request.attacks:  # bad attack options fail before any feature is computed
        build_attack(spec, threat)


def run_diffusion_probe(request: ProbeRequest, engine: Engine | None = None) -> list[str]:
    """Fit and attack the probes of ``request.representations``; one row per representation and attack
    in the results DB behind ``engine``; returns their keys."""
    threat = check_probe_request(request)
    test = load_split(request.dataset, "test", request.data_root)
    train = load_split(request.dataset, "train", request.data_root)
    artifacts = ArtifactCache(request.artifact_root)
    test_idx = evaluation_subset(len(test.labels), min(request.n, len(test.labels)))
    train_idx = evaluation_subset(len(train.labels), min(request.train_n, len(train.labels)))
    classes = test.info.num_classes
    prepared = {name: _prepare(name, request, train, train_idx, artifacts) for name in request.representations}

    def compute(session, run_id: int) -> list[str]:
        keys = []
        for name, (features, train_features, setting, feature_seconds) in prepared.items():
            started = time.time()
            probe = train_probe(train_features, train.labels[train_idx], classes, steps=request.probe_steps,
                                lr=request.probe_lr, weight_decay=request.weight_decay, seed=request.seed)
            with torch.inference_mode():
                train_acc = float((probe(train_features).argmax(1) == train.labels[train_idx]).float().mean())
            probe_seconds = round(time.time() - started, 1)
            for spec in request.attacks:
                outcome = probe_robustness(features, probe, test, test_idx, spec, threat, request.seed,
                                           request.batch_size, request.progress)
                config = {"representation": name, **setting, "dataset": test.info.name,
                          "fingerprint": test.fingerprint, "train_fingerprint": train.fingerprint,
                          "n": len(test_idx), "train_n": len(train_idx), "threat": request.threat,
                          "eps": request.eps, "attack": outcome["attack"], "seed": request.seed,
                          "probe": {"kind": "multinomial logistic regression on standardised features",
                                    "optimizer": "full-batch Adam", "steps": request.probe_steps,
                                    "lr": request.probe_lr, "weight_decay": request.weight_decay},
                          "subset": "first n of the fixed evaluation permutation (test and train splits)"}
                result = {**{k: outcome[k] for k in ("clean_acc", "robust_acc", "attack_label",
                                                     "max_perturbation")},
                          "train_acc": train_acc, "feature_dim": int(train_features.shape[1]),
                          "seconds": {"train_features": feature_seconds, "probe": probe_seconds,
                                      "attack": outcome["seconds"]}}
                keys.append(save_analysis(session, ANALYSIS_KIND, config, result, run_id).key)
        return keys

    return stored_run(engine, compute)


def _prepare(name: str, request: ProbeRequest, train: Split, train_idx: torch.Tensor,
             artifacts: ArtifactCache) -> tuple[FeatureFn, torch.Tensor, dict[str, Any], float]:
    """The representation's differentiable feature map, its training features, its setting, and the
    seconds the training features took (0 when read from the cache)."""
    started = time.time()
    if name == "diffusion":
        loaded, ddpm = load_feature_ddpm(artifacts, train, request.ddpm_preset, progress=request.progress)
        model = DiffusionFeatures(loaded.unet, loaded.scheduler.alphas_cumprod, request.timestep, request.block,
                                  request.pool)
        train_features = cached_features(artifacts, train, preset=request.ddpm_preset, timestep=request.timestep,
                                         block=request.block, pool=request.pool, seed=request.noise_seed,
                                         batch_size=request.feature_batch_size, progress=request.progress,
                                         indices=train_idx)
        shape = tuple(train.info.image_shape)

        def diffusion(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return model(x, pinned_noise(idx, shape, request.noise_seed))

        setting = {"features": {"ddpm": ddpm.key, "ddpm_preset": request.ddpm_preset,
                                "timestep": request.timestep, "block": request.block, "pool": request.pool,
                                "noise": {"seed": request.noise_seed, "namespace": NOISE_NAMESPACE,
                                          "pinned": "per image index"}}}
        return diffusion, train_features, setting, round(time.time() - started, 1)
    loaded_clf = resolve_classifier(request.classifier, train.info, artifacts=artifacts, data_root=request.data_root,
                                    threat=request.threat, progress=request.progress)
    network = loaded_clf.model
    train_features, _ = network_features(network, train, train_idx, request.feature_batch_size, request.progress,
                                         "classifier: train features")

    def classifier(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return penultimate_features(network, x)

    setting = {"features": {"classifier": loaded_clf.id, "layer": "penultimate (features())"}}
    return classifier, train_features, setting, round(time.time() - started, 1)

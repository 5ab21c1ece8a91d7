"""Representation analyses of the DRA paper (PAPERS.md §3) for classifier entries: how many directions
the penultimate features use, and how disentangled they are.

* :func:`effective_rank` -- Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
  EUSIPCO 2007: ``exp(H(p))`` with ``p`` the singular values of the centred feature matrix normalised to
  sum 1 and ``H`` their Shannon entropy.
* :class:`TopKSAE` / :func:`train_sae` / :func:`sae_loss` -- a top-k sparse autoencoder (Makhzani & Frey,
  "k-Sparse Autoencoders", arXiv 1312.5663; Gao et al., "Scaling and evaluating sparse autoencoders",
  arXiv 2406.04093: ``z = ReLU(TopK(W_enc (x - b_pre) + b_enc))``, ``x_hat = W_dec z + b_pre``,
  unit-norm decoder rows, the encoder initialised to the decoder's transpose), and its normalised MSE
  (reconstruction error over the error of predicting the mean). With one dictionary size and one k for
  every entry, a lower loss means features closer to sparse combinations of a few directions, i.e.
  more disentangled.

:func:`run_representations` computes both for each entry on the test images a cell uses and stores
one row per entry (kind ``representations``) in the results DB; ``harness report`` renders them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from sqlalchemy.engine import Engine
from torch import nn
from tqdm import tqdm

from harness.analysis.networks import check_classifier_entries, classifier_network, stored_run
from harness.classifiers.architectures import penultimate_features
from harness.classifiers.sources import DEFAULT_CLASSIFIER
from harness.core.artifacts import ArtifactCache
from harness.core.entry import DefenseEntry
from harness.core.errors import UsageError
from harness.core.registry import Registry
from harness.data import Split, dataset_info, load_split
from harness.evaluation.runner import evaluation_subset
from harness.results.queries import save_analysis

__all__ = ["ANALYSIS_KIND", "effective_rank", "TopKSAE", "train_sae", "sae_loss", "SAESettings",
           "RepresentationsRequest", "check_request", "network_features", "run_representations"]

ANALYSIS_KIND = "representations"


def effective_rank(features: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007) of the rows of ``features`` (N, D), centred: 1 for a rank-1
    matrix, k for k orthogonal directions of equal variance; 0 if all rows are equal."""
    x = features.detach().double()
    x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if total <= 0 or not torch.isfinite(total):
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class TopKSAE(nn.Module):
    """A top-k sparse autoencoder with ``latents`` dictionary atoms of dimension ``dim`` (Gao et al. 2024)."""

    def __init__(self, dim: int, latents: int, k: int, seed: int = 0):
        super().__init__()
        if not 1 <= k <= latents:
            raise UsageError(f"the SAE's k must be in 1..{latents} (the dictionary size), got {k}")
        self.k = int(k)
        gen = torch.Generator().manual_seed(seed)
        decoder = torch.randn((latents, dim), generator=gen)
        decoder = decoder / decoder.norm(dim=1, keepdim=True)
        self.decoder = nn.Parameter(decoder)
        self.encoder = nn.Parameter(decoder.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(latents))
        self.b_pre = nn.Parameter(torch.zeros(dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse codes (N, latents) with at most ``k`` non-zeros per row."""
        pre = (x - self.b_pre) @ self.encoder + self.b_enc
        values, idx = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter(1, idx, values.relu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x) @ self.decoder + self.b_pre

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.decoder.div_(self.decoder.norm(dim=1, keepdim=True).clamp_min(1e-12))


@dataclass(frozen=True)
class SAESettings:
    """The SAE's dictionary size, k and training budget: the same for every entry compared."""

    latents: int = 1024
    k: int = 32
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0

    def check(self) -> "SAESettings":
        for name in ("latents", "k", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"the SAE's {name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.latents:
            raise UsageError(f"the SAE's k ({self.k}) cannot exceed its dictionary size ({self.latents})")
        if not self.lr > 0:
            raise UsageError(f"the SAE's learning rate must be > 0, got {self.lr}")
        return self


@dataclass(frozen=True)
class _Scaling:
    """Inputs are centred on the training mean and scaled by one number (their RMS norm), so the loss
    of one entry does not depend on the scale of its features."""

    mean: torch.Tensor
    scale: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def _scaling(train: torch.Tensor) -> _Scaling:
    mean = train.mean(dim=0)
    scale = float((train - mean).pow(2).sum(dim=1).mean().sqrt())
    return _Scaling(mean, scale if scale > 0 else 1.0)


def train_sae(train: torch.Tensor, settings: SAESettings, progress: bool = False) -> tuple[TopKSAE, _Scaling]:
    """A :class:`TopKSAE` trained with Adam on the MSE of the (scaled) rows of ``train``; batches are
    drawn from a private generator, so training is reproducible."""
    settings.check()
    scaling = _scaling(train.float())
    data = scaling(train.float())
    sae = TopKSAE(data.shape[1], settings.latents, settings.k, settings.seed)
    opt = torch.optim.Adam(sae.parameters(), lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    for _ in tqdm(range(settings.steps), desc="top-k SAE", disable=not progress, unit="step"):
        batch = data[torch.randint(0, len(data), (min(settings.batch_size, len(data)),), generator=gen)]
        loss = (sae(batch) - batch).pow(2).sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.normalise_decoder()
    return sae.eval().requires_grad_(False), scaling


@torch.inference_mode()
def sae_loss(sae: TopKSAE, scaling: _Scaling, features: torch.Tensor) -> dict[str, float]:
    """Normalised MSE of ``sae`` on ``features``: ``sum ||x - x_hat||^2 / sum ||x - mean_train||^2``
    (1 = no better than the training mean), and the share of dictionary atoms never used on them."""
    x = scaling(features.float())
    codes = sae.encode(x)
    error = (codes @ sae.decoder + sae.b_pre - x).pow(2).sum()
    baseline = x.pow(2).sum()
    nmse = float(error / baseline) if baseline > 0 else math.nan
    return {"nmse": nmse, "dead_latents": float(((codes != 0).sum(dim=0) == 0).float().mean())}


@torch.no_grad()
def network_features(network: nn.Module, split: Split, indices: torch.Tensor, batch_size: int = 256,
                     progress: bool = False, what: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, D) of ``network`` on ``split``'s images at ``indices``, and its logits."""
    feats, logits = [], []
    with torch.inference_mode():
        for lo in tqdm(range(0, len(indices), batch_size), desc=what, disable=not progress, unit="batch"):
            f = penultimate_features(network, split.float_images(indices[lo:lo + batch_size]))
            feats.append(f.float())
            logits.append(network.classify_features(f).float())
    return torch.cat(feats), torch.cat(logits)


@dataclass(frozen=True)
class RepresentationsRequest:
    """Entries to analyse (of kind classifier, or the undefended ``none`` on ``classifier``), the test
    images (``n``: the first ``n`` a cell evaluates), the SAE's training images (``train_n`` of the
    training split, the first of one fixed permutation) and the SAE settings."""

    defenses: tuple[str, ...]
    dataset: str = "cifar10"
    classifier: str = DEFAULT_CLASSIFIER
    preset: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    n: int = 512
    train_n: int = 10000
    sae: SAESettings = SAESettings()
    train_seed: int = 0
    batch_size: int = 256
    data_root: str | None = None
    artifact_root: str | None = None
    progress: bool = True


def check_request(request: RepresentationsRequest,
                  registry: Registry[DefenseEntry] | None = None) -> list[DefenseEntry]:
    """The request's entries, every input checked (a one-line :class:`UsageError` naming the valid
    choices) before anything is loaded or computed."""
    if not request.defenses:
        raise UsageError("name at least one defense (--defense A,B,...)")
    if request.n < 2 or request.train_n < 2:
        raise UsageError(f"--n and --train-n must be >= 2 (got {request.n} and {request.train_n})")
    request.sae.check()
    dataset_info(request.dataset)
    return check_classifier_entries(request.defenses, request.options, request.preset, "representations",
                                    registry)


def run_representations(request: RepresentationsRequest, engine: Engine | None = None,
                        registry: Registry[DefenseEntry] | None = None) -> list[str]:
    """Effective rank and SAE loss of each entry's penultimate features on the test subset; one row per
    entry in the results DB behind ``engine``. Every name is checked before anything is computed.
    Returns the rows' keys."""
    entries = check_request(request, registry)
    test = load_split(request.dataset, "test", request.data_root)
    train = load_split(request.dataset, "train", request.data_root)
    artifacts = ArtifactCache(request.artifact_root)
    test_idx = evaluation_subset(len(test.labels), min(request.n, len(test.labels)))
    train_idx = evaluation_subset(len(train.labels), min(request.train_n, len(train.labels)))

    def compute(session, run_id: int) -> list[str]:
        keys = []
        for entry in entries:
            keys.append(_one(request, entry, test, train, test_idx, train_idx, artifacts, session, run_id))
        return keys

    return stored_run(engine, compute)


def _one(request: RepresentationsRequest, entry: DefenseEntry, test: Split, train: Split, test_idx: torch.Tensor,
         train_idx: torch.Tensor, artifacts: ArtifactCache, session, run_id: int) -> str:
    started = time.time()
    net = classifier_network(entry, request.classifier, test.info, artifacts, preset=request.preset,
                             options=request.options, data_root=request.data_root, progress=request.progress,
                             train_seed=request.train_seed)
    f_train, _ = network_features(net.model, train, train_idx, request.batch_size, request.progress,
                                  f"{entry.name}: train features")
    f_test, logits = network_features(net.model, test, test_idx, request.batch_size, request.progress,
                                      f"{entry.name}: test features")
    featured = time.time()
    sae, scaling = train_sae(f_train, request.sae, request.progress)
    trained = time.time()
    on_test, on_train = sae_loss(sae, scaling, f_test), sae_loss(sae, scaling, f_train)
    config = {**net.setting, "dataset": test.info.name, "fingerprint": test.fingerprint,
              "train_fingerprint": train.fingerprint, "n": len(test_idx), "train_n": len(train_idx),
              "subset": "first n of the fixed evaluation permutation (test and train splits)",
              "sae": {"latents": request.sae.latents, "k": request.sae.k, "steps": request.sae.steps,
                      "batch_size": request.sae.batch_size, "lr": request.sae.lr, "seed": request.sae.seed}}
    result = {"effective_rank": effective_rank(f_test), "feature_dim": int(f_test.shape[1]),
              "sae_loss": on_test["nmse"], "sae_train_loss": on_train["nmse"],
              "dead_latents": on_test["dead_latents"],
              "clean_acc": float((logits.argmax(1) == test.labels[test_idx]).float().mean()),
              "seconds": {"features": round(featured - started, 1), "sae": round(trained - featured, 1)}}
    return save_analysis(session, ANALYSIS_KIND, config, result, run_id).key

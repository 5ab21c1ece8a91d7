"""Diffusion-generated, labelled training sets (Wang et al., "Better Diffusion Models Further Improve
Adversarial Training", ICML 2023), and measures of their quality.

:func:`synthetic_set` trains the dataset's class-conditional DDPM if missing
(:mod:`harness.toolkit.diffusion.conditional`: Ho et al. 2020 training, label dropout for
classifier-free guidance, Ho & Salimans 2022), then samples a class-balanced set with the DDIM chain
(Song et al. 2021) and guidance weight ``w``, and caches it as an artifact ``synthetic/<hash>``:
``weights.safetensors`` holds ``images`` (uint8, N x C x H x W) and ``labels`` (int64, N),
``provenance.json`` the generator's artifact hash, the sampler, guidance, seed, class balance and the
set's content fingerprint (:func:`harness.data.disk.fingerprint`), and ``quality.json`` the quality
measures once computed. A set is training-only: it has no test split.

**Class balance.** Image ``i`` has label ``i % C`` (C classes): each class gets ``n // C`` images and
the first ``n % C`` classes one more (n = 20, C = 10: 2 each; n = 23: 3 for classes 0-2, 2 for the
rest), and every prefix of the set is as balanced as possible.

**Determinism.** Image ``i``'s starting (and, with ``eta > 0``, per-step) noise comes from its own
generator seeded by ``sha256(seed, i)``, so a set depends on its seed and not on how it is batched; the
fingerprint changes with the seed.

**Quality.** :func:`label_agreement` (offline): the fraction of images a base classifier (default
``trained:small``) assigns to their requested class. :func:`frechet_distance`: FID through torchmetrics,
for users with its Inception weights (a one-line :class:`UsageError` when they are missing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from filelock import FileLock
from tqdm import tqdm

from harness.classifiers.sources import DEFAULT_CLASSIFIER, resolve_classifier
from harness.core.artifacts import Artifact, ArtifactCache
from harness.core.errors import MissingArtifactError, UsageError
from harness.core.registry import suggest
from harness.data import Split, dataset_info, load_split
from harness.data.disk import fingerprint as content_fingerprint
from harness.toolkit.diffusion.conditional import (ConditionalDDPM, conditional_from_artifact,
                                                   sample_conditional, shared_conditional_ddpm)
from harness.toolkit.diffusion.model import ddpm_preset
from harness.toolkit.diffusion.sampler import SAMPLERS

__all__ = ["SYNTHETIC_VERSION", "DEFAULT_SAMPLER", "DEFAULT_GUIDANCE", "SamplerSpec", "SyntheticSet",
           "parse_sampler", "class_balance", "synthetic_recipe", "synthetic_set", "label_agreement",
           "frechet_distance", "synthetic_sets"]

SYNTHETIC_VERSION = "1"
DEFAULT_SAMPLER = "ddim:steps=10"
#: w of (1 + w) eps(x, c) - w eps(x): a moderate weight (Ho & Salimans 2022 sweep w in [0, 4]); a CPU-sized
#: generator draws class-ambiguous images without guidance, and training data need the label first
DEFAULT_GUIDANCE = 1.0
GENERATION_BATCH = 100  # images per UNet call (doubled with guidance); not part of the recipe
KIND = "synthetic"
QUALITY = "quality.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerSpec:
    """A parsed ``name:steps=K[,eta=E]`` spec: ``ddim`` (eta 0, Song et al. 2021) or ``ddpm`` (eta 1)."""

    name: str
    steps: int
    eta: float

    @property
    def text(self) -> str:
        """The canonical spec (eta only when it differs from the sampler's default)."""
        eta = "" if self.eta == SAMPLERS[self.name] else f",eta={self.eta:g}"
        return f"{self.name}:steps={self.steps}{eta}"


def parse_sampler(spec: str, num_train_timesteps: int | None = None) -> SamplerSpec:
    """``ddim``, ``ddim:steps=10``, ``ddpm:steps=100,eta=0.5`` -> :class:`SamplerSpec`; bad input is a
    one-line :class:`UsageError` naming the valid choices."""
    name, _, rest = str(spec).strip().partition(":")
    name = name.strip().lower()
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r} in {spec!r}{suggest(name, list(SAMPLERS))}; valid: "
                         f"{', '.join(f'{s}:steps=K' for s in SAMPLERS)} (optionally ,eta=E)")
    values: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("steps", "eta"):
            raise UsageError(f"bad sampler option {item!r} in {spec!r}{suggest(key, ['steps', 'eta'])}; "
                             f"valid: steps=K (integer >= 1), eta=E (>= 0)")
        values[key] = value.strip()
    limit = num_train_timesteps or 10**9
    try:
        steps = int(values.get("steps", "10"))
        eta = float(values.get("eta", SAMPLERS[name]))
    except ValueError:
        raise UsageError(f"bad sampler spec {spec!r}: steps must be an integer and eta a number; "
                         f"valid: steps=K (1 <= K <= {limit}), eta=E (>= 0)") from None
    if not 1 <= steps <= limit:
        raise UsageError(f"bad sampler spec {spec!r}: steps must be in [1, {limit}], got {steps}")
    if not (math.isfinite(eta) and eta >= 0):
        raise UsageError(f"bad sampler spec {spec!r}: eta must be a finite number >= 0, got {eta}")
    return SamplerSpec(name, steps, eta)


def class_balance(n: int, num_classes: int) -> torch.Tensor:
    """The requested labels: ``i % num_classes`` for image ``i`` (the first ``n % num_classes`` classes
    get one image more than the others)."""
    return torch.arange(int(n), dtype=torch.int64) % int(num_classes)


@dataclass(frozen=True)
class SyntheticSet:
    """A generated, labelled training set: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,), its
    content ``fingerprint`` and JSON-able ``provenance`` (with ``quality`` once measured); ``path`` is
    its artifact folder."""

    images: torch.Tensor
    labels: torch.Tensor
    fingerprint: str
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def float_images(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The images (or those at ``indices``) as float32 in [0, 1]."""
        images = self.images if indices is None else self.images[indices]
        return images.float().div_(255)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=int(self.provenance.get("num_classes", 0))).tolist()


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UsageError(f"the number of synthetic images must be an integer >= 1, got {n!r}")
    return int(n)


def _check_guidance(guidance: Any) -> float:
    try:
        w = float(guidance)
    except (TypeError, ValueError):
        w = float("nan")
    if not (math.isfinite(w) and w >= 0):
        raise UsageError(f"guidance must be a finite number >= 0 (0: conditional only), got {guidance!r}")
    return w


def synthetic_recipe(dataset: str, generator: Artifact, n: int, sampler: SamplerSpec, guidance: float,
                     seed: int) -> dict[str, Any]:
    """What determines a synthetic set (hashed into its artifact key)."""
    return {"what": KIND, "version": SYNTHETIC_VERSION, "dataset": dataset, "generator": generator.key,
            "n": int(n), "sampler": {"name": sampler.name, "steps": sampler.steps, "eta": sampler.eta},
            "guidance": float(guidance), "seed": int(seed), "balance": "round-robin", "noise": "per-image-sha256"}


def _image_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"harness-synthetic:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generate(model: ConditionalDDPM, labels: torch.Tensor, sampler: SamplerSpec, guidance: float, seed: int,
              shape: tuple[int, int, int], progress: bool, desc: str) -> torch.Tensor:
    """uint8 images of ``labels``, generated in batches of :data:`GENERATION_BATCH` under a tqdm bar."""
    n = len(labels)
    out = torch.empty((n, *shape), dtype=torch.uint8)
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, n, GENERATION_BATCH):
            stop = min(start + GENERATION_BATCH, n)
            gens = [torch.Generator().manual_seed(_image_seed(seed, i)) for i in range(start, stop)]
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
            step_noise = (torch.stack([torch.randn((sampler.steps, *shape), generator=g) for g in gens], dim=1)
                          if sampler.eta > 0 else None)
            x = sample_conditional(model, labels[start:stop], noise, steps=sampler.steps, eta=sampler.eta,
                                   guidance=guidance, step_noise=step_noise)
            out[start:stop] = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            bar.update(stop - start)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _load(path: Path) -> SyntheticSet:
    tensors = Artifact(path.name, path, {}).load()
    provenance = _read_json(path / "provenance.json")
    quality = _read_json(path / QUALITY)
    if quality:
        provenance["quality"] = quality
    images, labels = tensors["images"], tensors["labels"]
    return SyntheticSet(images, labels, content_fingerprint(images.numpy(), labels.numpy()), provenance, path)


def synthetic_set(artifacts: ArtifactCache, dataset: str, n: int, *, sampler: str = DEFAULT_SAMPLER,
                  guidance: float = DEFAULT_GUIDANCE, seed: int = 0, preset: str = "small",
                  data_root: str | os.PathLike | None = None, progress: bool = True) -> SyntheticSet:
    """A class-balanced set of ``n`` generated images of ``dataset`` (see the module docstring): the
    conditional DDPM of ``preset`` is trained if missing, then the set is generated with ``sampler`` and
    guidance weight ``guidance`` from ``seed``, or loaded from the cache."""
    n = _check_n(n)
    w = _check_guidance(guidance)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UsageError(f"seed must be an integer, got {seed!r}")
    dataset_info(dataset)  # an unknown name fails here, naming the valid ones
    config = ddpm_preset(preset)
    spec = parse_sampler(sampler, int(config["schedule"]["num_train_timesteps"]))
    split = load_split(dataset, "train", data_root)
    generator = shared_conditional_ddpm(artifacts, preset, split, 0, progress=progress)
    recipe = synthetic_recipe(split.info.name, generator, n, spec, w, int(seed))
    what = f"synthetic {split.info.name} set (n={n}, {spec.text}, w={w:g}, seed={seed})"
    path = artifacts.path_for(KIND, recipe)
    if artifacts.find(KIND, recipe) is None:
        if not artifacts.allow_train:
            raise MissingArtifactError(f"the {what} is not generated yet (recipe under {path}); run without "
                                       f"--no-train, or generate it with `harness data synth`")
        with artifacts.lock(KIND, recipe):
            if artifacts.find(KIND, recipe) is None:
                _produce(artifacts, recipe, split, generator, spec, w, int(seed), progress, what)
    return _load(path)


def _produce(artifacts: ArtifactCache, recipe: Mapping[str, Any], split: Split, generator: Artifact,
             spec: SamplerSpec, guidance: float, seed: int, progress: bool, what: str) -> None:
    info = split.info
    model = conditional_from_artifact(generator, info.image_shape)
    labels = class_balance(int(recipe["n"]), info.num_classes)
    log.info("generating the %s", what)
    started = time.time()
    images = _generate(model, labels, spec, guidance, seed, info.image_shape, progress,
                       desc=f"synth {info.name}")
    seconds = round(time.time() - started, 1)
    counts = torch.bincount(labels, minlength=info.num_classes).tolist()
    provenance = {
        "kind": KIND, "training_only": True, "dataset": info.name, "n": len(labels),
        "num_classes": info.num_classes, "image_shape": list(info.image_shape),
        "fingerprint": content_fingerprint(images.numpy(), labels.numpy()),
        "generator": {**model.provenance, "recipe_version": generator.recipe["version"],
                      "conditional": True, "null_class": model.null_class},
        "sampler": spec.text, "steps": spec.steps, "eta": spec.eta, "guidance": guidance,
        "guidance_form": "(1 + w) eps(x, c) - w eps(x, null) (Ho & Salimans 2022)",
        "seed": seed, "noise": "image i: torch.Generator seeded by sha256(seed, i)",
        "class_balance": {"scheme": "label i % C; the first n % C classes get one more", "counts": counts},
        "generation_seconds": seconds, "seconds_per_1000": round(1000 * seconds / len(labels), 1),
        "threads": torch.get_num_threads(),
        "train_data": {"dataset": info.name, "split": split.split, "fingerprint": split.fingerprint},
    }
    artifacts.store(KIND, recipe, {"images": images, "labels": labels}, provenance)


def _update_quality(synthetic: SyntheticSet, key: str, value: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``{key: value}`` into the set's ``quality.json`` (atomically, under a lock); return it all."""
    if synthetic.path is None:
        return {key: dict(value)}
    path = synthetic.path / QUALITY
    with FileLock(str(synthetic.path.parent / f".{synthetic.path.name}.quality.lock")):
        quality = _read_json(path)
        quality.setdefault(key, {}).update(value)
        fd, tmp = tempfile.mkstemp(prefix=".quality-", dir=synthetic.path)
        with os.fdopen(fd, "w") as fh:
            json.dump(quality, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)
    return quality


def label_agreement(artifacts: ArtifactCache, synthetic: SyntheticSet, classifier: str = DEFAULT_CLASSIFIER, *,
                    data_root: str | os.PathLike | None = None, progress: bool = True,
                    batch_size: int = 256) -> dict[str, Any]:
    """The fraction of the set's images that ``classifier`` (a base-classifier spec, default
    ``trained:small``, trained if missing) assigns to their requested label, overall and per class;
    stored under ``label_agreement`` in the set's ``quality.json``."""
    dataset = synthetic.provenance.get("dataset")
    if not dataset:
        raise UsageError("this synthetic set has no dataset in its provenance; regenerate it")
    info = load_split(dataset, "train", data_root).info
    loaded = resolve_classifier(classifier, info, artifacts=artifacts,
                                data_root=str(data_root) if data_root is not None else None, progress=progress)
    preds = []
    with torch.no_grad():
        for start in tqdm(range(0, len(synthetic), batch_size), desc="label agreement", disable=not progress):
            preds.append(loaded.model(synthetic.float_images(torch.arange(start, min(start + batch_size,
                                                                                       len(synthetic))))).argmax(1))
    hits = (torch.cat(preds) == synthetic.labels).double()
    per_class = [round(float(hits[synthetic.labels == c].mean()), 4) if bool((synthetic.labels == c).any())
                 else None for c in range(info.num_classes)]
    result = {loaded.id: {"agreement": round(float(hits.mean()), 4), "per_class": per_class,
                          "classifier": loaded.id, "n": len(synthetic)}}
    _update_quality(synthetic, "label_agreement", result)
    return result[loaded.id]


def _one_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def frechet_distance(synthetic: SyntheticSet, real: Split, *, feature: int = 2048, batch_size: int = 100,
                     progress: bool = True) -> float:
    """FID (torchmetrics ``FrechetInceptionDistance``, Inception-v3 features) between the set and the
    images of ``real``; stored under ``fid`` in the set's ``quality.json``. Needs torch-fidelity and its
    Inception weights: missing or undownloadable weights are a one-line :class:`UsageError`."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=feature, normalize=False)
    except Exception as exc:  # ImportError (no torch-fidelity), OSError/URLError (no weights, no network), ...
        raise UsageError(f"FID needs torchmetrics' Inception-v3 weights (through torch-fidelity), which are "
                         f"missing or cannot be downloaded ({type(exc).__name__}: {_one_line(exc)}); use the "
                         f"offline label agreement instead (`harness data synth --agreement`)") from None

    def feed(images: torch.Tensor, is_real: bool) -> None:
        for start in tqdm(range(0, len(images), batch_size), desc=f"fid {'real' if is_real else 'synthetic'}",
                          disable=not progress):
            batch = images[start:start + batch_size]
            metric.update(batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch, real=is_real)

    with torch.no_grad():
        feed(real.images, True)
        feed(synthetic.images, False)
        value = float(metric.compute())
    _update_quality(synthetic, "fid", {f"{real.info.name}-{real.split}@{real.fingerprint}":
                                       {"fid": round(value, 3), "feature": feature, "real_n": len(real.labels)}})
    return value


def synthetic_sets(artifacts: ArtifactCache) -> list[dict[str, Any]]:
    """One row per cached synthetic set (for ``harness data info``), oldest first."""
    folder = artifacts.root / KIND
    rows = []
    paths = sorted((p for p in folder.glob("*/weights.safetensors") if not p.parent.name.startswith(".")),
                   key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    for weights in paths:
        path = weights.parent
        prov = _read_json(path / "provenance.json")
        quality = _read_json(path / QUALITY)
        agreement = quality.get("label_agreement", {})
        fid = quality.get("fid", {})
        rows.append({
            "synthetic": path.name, "dataset": prov.get("dataset"), "n": prov.get("n"),
            "fingerprint": prov.get("fingerprint"), "generator": prov.get("generator", {}).get("artifact"),
            "sampler": prov.get("sampler"), "guidance": prov.get("guidance"), "seed": prov.get("seed"),
            "agreement": ",".join(f"{v['agreement']:.4f} ({k})" for k, v in agreement.items()) or "not computed",
            **({"fid": ",".join(f"{v['fid']} ({k})" for k, v in fid.items())} if fid else {}),
            "path": str(path),
        })
    return rows


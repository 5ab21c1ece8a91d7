"""Base classifiers from a source string.

* ``trained:<preset>`` (default ``trained:small``): trained here by harness's own recipe
  (:mod:`harness.classifiers.training`), cached under the hash of that recipe, trained on demand.
* a file path: ``.safetensors`` with ``arch`` and ``num_classes`` in its metadata, or ``.pt``/``.pth``
  holding ``{"arch", "num_classes", "state_dict"}`` (loaded with ``weights_only=True``).
* ``robustbench:<model name>``: the RobustBench model zoo (optional extra ``harness[robustbench]``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save
from torch import nn

from harness.core import paths
from harness.core.artifacts import Artifact, ArtifactCache
from harness.data import DatasetInfo, load_split
from harness.data.disk import read_meta
from harness.core.errors import UsageError
from harness.core.registry import Registry, suggest
from harness.classifiers.architectures import build_classifier
from harness.classifiers.training import CLASSIFIER_PRESETS, train_classifier

log = logging.getLogger(__name__)
DEFAULT_CLASSIFIER = "trained:small"
ROBUSTBENCH_THREATS = {"linf": "Linf", "l2": "L2"}


@dataclass
class LoadedClassifier:
    """A frozen classifier in eval mode, the id that names it in cells, and its provenance."""

    model: nn.Module
    id: str
    provenance: dict[str, Any] = field(default_factory=dict)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_classifier(model: nn.Module, arch: str, num_classes: int, path: str | os.PathLike) -> Path:
    """Write ``model`` as a safetensors file that the file-path source can load."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"num_classes": str(num_classes), "arch": arch}
    path.write_bytes(_in_order(save(state, metadata=metadata), metadata))
    return path


def _in_order(blob: bytes, metadata: dict[str, str]) -> bytes:
    """``blob`` (a safetensors file) with its metadata in the order of ``metadata``. safetensors writes
    it in hash order, which differs from call to call, but one model must give one file, hence one
    classifier id (``num_classes`` first, the order of the files behind release 0.1.0's key fixture)."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return blob[:8] + text.ljust(size) + blob[8 + size:]


def _check_preset(preset: str) -> None:
    if preset not in CLASSIFIER_PRESETS:
        raise UsageError(f"unknown classifier preset {preset!r}{suggest(preset, CLASSIFIER_PRESETS)}; "
                         f"valid: {', '.join(CLASSIFIER_PRESETS)}")


def classifier_recipe(preset: str, dataset: DatasetInfo, train_fingerprint: str, seed: int) -> dict[str, Any]:
    _check_preset(preset)
    return {"what": "classifier", "preset": preset, "config": CLASSIFIER_PRESETS[preset],
            "dataset": dataset.name, "train_fingerprint": train_fingerprint, "seed": seed}


def _trained(preset: str, dataset: DatasetInfo, data_root: str | None, artifacts: ArtifactCache,
             progress: bool, seed: int) -> LoadedClassifier:
    train = load_split(dataset.name, "train", data_root)
    recipe = classifier_recipe(preset, dataset, train.fingerprint, seed)
    config = recipe["config"]

    def produce() -> dict[str, torch.Tensor]:
        test = load_split(dataset.name, "test", data_root)
        model, metrics = train_classifier(train.images, train.labels, dataset.num_classes, config,
                                          seed=seed, progress=progress, eval_images=test.images,
                                          eval_labels=test.labels, dataset=dataset)
        log.info("trained classifier %s: %s", preset, metrics)
        return model.state_dict()

    artifact = artifacts.get_or_train("classifier", recipe, produce,
                                      what=f"the {preset!r} {dataset.name} classifier")
    model = _trained_model(artifact, config["arch"], dataset)
    return LoadedClassifier(model, f"trained:{preset}@{artifact.key}",
                            {"source": "trained", "recipe": recipe, "artifact": str(artifact.path)})


def _trained_model(artifact: Artifact, arch: str, dataset: DatasetInfo) -> nn.Module:
    """The frozen classifier of a cached artifact; a damaged one is a one-line UsageError saying to delete it."""
    model = build_classifier(arch, dataset.num_classes, dataset.image_shape)
    problem = _misfit(model, artifact.load())
    if problem:
        raise UsageError(f"cached artifact {artifact.path} does not fit architecture {arch!r} ({problem}); "
                         f"delete that folder and run again to retrain it")
    return freeze(model)


def _misfit(model: nn.Module, state: dict[str, Any]) -> str | None:
    """Load ``state`` into ``model``; why it does not fit, or None."""
    try:
        fit = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:  # shapes differ, values are no tensors
        return " ".join(str(exc).split())[:300]
    if fit.missing_keys or fit.unexpected_keys:
        return f"missing {_few(fit.missing_keys)}, unexpected {_few(fit.unexpected_keys)}"
    return None


def _few(keys: list[str]) -> str:
    """``"2 keys (a, b)"``: how many state-dict keys, and the first few."""
    shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"{len(keys)} key{'' if len(keys) == 1 else 's'}" + (f" ({shown})" if keys else "")


def _first_line(exc: BaseException) -> str:
    """The first sentence of ``exc``'s message (library errors go on with advice over several lines)."""
    line = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return line.split(". ")[0]


#: in torch's weights-only error: the Python object a refused pickle names, or what else stopped it
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_STOPPED = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")


def _load_pt(path: Path) -> Any:
    """The payload of a ``.pt`` file, unpickled by torch's weights-only loader (tensors, plain containers
    and numbers; never code); a one-line :class:`UsageError` for a file that is damaged or holds more."""
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a file it refuses anyway
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found:
            raise UsageError(f"{path} is not a safe checkpoint: it holds the Python object {found[1]}, which "
                             f"loading would have to run; harness loads only tensors (save the weights with "
                             f"harness.api.save_classifier as .safetensors)") from None
        stopped = _STOPPED.search(str(exc))
        raise UsageError(f"{path} is not a readable PyTorch checkpoint (the weights-only unpickler stopped at: "
                         f"{stopped[1].strip() if stopped else 'content that is not tensors'}); it may be "
                         f"corrupt, or not a checkpoint") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ... for a damaged archive
        raise UsageError(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)}); it may be "
                         f"truncated or corrupt") from None


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, state dict)`` of a classifier file; a one-line :class:`UsageError` for a bad one."""
    if not path.is_file():
        raise UsageError(f"classifier file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            return meta, load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"{path} is not a readable safetensors file ({_first_line(exc)}); it may be "
                             f"truncated or corrupt") from None
    if path.suffix in (".pt", ".pth"):
        payload = _load_pt(path)
        if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
            raise UsageError(f"{path} must hold a dict with keys arch, num_classes, state_dict")
        return payload, payload["state_dict"]
    raise UsageError(f"unsupported classifier file {path.name}; valid: .safetensors, .pt, .pth")


def _from_file(path: Path, dataset: DatasetInfo) -> LoadedClassifier:
    meta, state = _read_checkpoint(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if "arch" not in meta:
        raise UsageError(f"{path} does not say its architecture (metadata key 'arch')")
    try:
        num_classes = int(meta.get("num_classes", dataset.num_classes))
    except (TypeError, ValueError):
        raise UsageError(f"{path}: num_classes must be a whole number, got {meta['num_classes']!r}") from None
    if num_classes != dataset.num_classes:
        raise UsageError(f"{path} has {num_classes} classes but {dataset.name} has {dataset.num_classes}")
    model = build_classifier(str(meta["arch"]), num_classes, dataset.image_shape)
    problem = _misfit(model, state)
    if problem:
        raise UsageError(f"{path} does not fit architecture {meta['arch']!r}: {problem}")
    return LoadedClassifier(freeze(model), f"file:{path.name}@{digest}",
                            {"source": "file", "path": str(path), "sha256_16": digest, "arch": meta["arch"]})


def import_robustbench():
    """Import robustbench, aliasing the ``autoattack`` module it expects to ``pyautoattack``."""
    try:
        sys.modules.setdefault("autoattack", importlib.import_module("pyautoattack"))
        from robustbench.utils import load_model
    except ImportError as exc:
        raise UsageError("robustbench is not installed (or cannot import beside this torch): "
                         "pip install 'harness[robustbench]' (it needs torchvision and setuptools<81); "
                         f"import error: {exc}") from None
    return load_model


def _from_robustbench(name: str, dataset: DatasetInfo, threat: str, model_dir: Path) -> LoadedClassifier:
    load_model = import_robustbench()
    if threat not in ROBUSTBENCH_THREATS:
        raise UsageError(f"robustbench has no threat model {threat!r}; valid: {', '.join(ROBUSTBENCH_THREATS)}")
    model = load_model(model_name=name, model_dir=str(model_dir), dataset=dataset.name,
                       threat_model=ROBUSTBENCH_THREATS[threat])
    return LoadedClassifier(freeze(model), f"robustbench:{name}",
                            {"source": "robustbench", "name": name, "model_dir": str(model_dir)})


def _trained_source(rest: str, dataset: DatasetInfo, *, artifacts: ArtifactCache, data_root: str | None,
                    threat: str, progress: bool, seed: int) -> LoadedClassifier:
    return _trained(rest, dataset, data_root, artifacts, progress, seed)


def _robustbench_source(rest: str, dataset: DatasetInfo, *, artifacts: ArtifactCache, data_root: str | None,
                        threat: str, progress: bool, seed: int) -> LoadedClassifier:
    return _from_robustbench(rest, dataset, threat, artifacts.root / "robustbench")


def _file_source(rest: str, dataset: DatasetInfo, *, artifacts: ArtifactCache, data_root: str | None,
                 threat: str, progress: bool, seed: int) -> LoadedClassifier:
    return _from_file(Path(rest).expanduser(), dataset)


SOURCE_GROUP = "harness.classifier_sources"
_registry: Registry[Callable[..., LoadedClassifier]] | None = None


def source_registry() -> Registry[Callable[..., LoadedClassifier]]:
    """Where a base classifier can come from, by the prefix of its spec (plugins:
    ``harness.classifier_sources``, each a loader ``(rest, dataset, *, artifacts, data_root, threat,
    progress, seed) -> LoadedClassifier``)."""
    global _registry
    if _registry is None:
        registry: Registry[Callable[..., LoadedClassifier]] = Registry("classifier source", group=SOURCE_GROUP)
        registry.add("trained", _trained_source, summary=f"trained:<preset>: trained here by harness's recipe "
                     f"(presets: {', '.join(CLASSIFIER_PRESETS)}), cached by recipe hash")
        registry.add("file", _file_source, summary="file:<path> or a bare path: a .safetensors/.pt file of a "
                     "harness architecture (never unpickled)")
        registry.add("robustbench", _robustbench_source, summary="robustbench:<model name>: the RobustBench "
                     "model zoo (optional extra harness[robustbench])", paper="Croce et al., NeurIPS 2021 D&B")
        _registry = registry
    return _registry


def _source(spec: str) -> tuple[str, str]:
    """``(source name, rest)`` of a classifier spec; a UsageError naming the valid forms otherwise."""
    kind, sep, rest = spec.partition(":")
    registry = source_registry()
    if sep and kind in registry.names():
        return kind, rest
    path = Path(spec).expanduser()
    if path.suffix in (".safetensors", ".pt", ".pth") or path.exists():
        return "file", spec
    close = suggest(spec, [f"{name}:{rest}" for name in registry.names()]) if sep else ""
    raise UsageError(f"cannot read classifier source {spec!r}{close}; valid forms: "
                     + "; ".join(i.summary for i in registry.items()))


def check_classifier(spec: str, dataset: DatasetInfo, *, artifacts: ArtifactCache, data_root: str | None = None,
                     seed: int = 0) -> None:
    """Check ``spec`` before a run stores anything, without training or downloading: its source exists,
    a ``trained:`` preset is known (and its cached weights, if any, load), a file is a readable, safe
    checkpoint that fits ``dataset``, and robustbench is installed for a ``robustbench:`` model."""
    kind, rest = _source(spec)
    if kind == "trained":
        _check_preset(rest)
        meta = read_meta(paths.data_root(data_root), dataset.name) or {}
        fingerprint = meta.get("splits", {}).get("train", {}).get("fingerprint")
        cached = fingerprint and artifacts.find("classifier", classifier_recipe(rest, dataset, fingerprint, seed))
        if cached:
            _trained_model(cached, CLASSIFIER_PRESETS[rest]["arch"], dataset)
    if kind == "file":
        _from_file(Path(rest).expanduser(), dataset)
    if kind == "robustbench":
        import_robustbench()


def resolve_classifier(spec: str, dataset: DatasetInfo, *, artifacts: ArtifactCache,
                       data_root: str | None = None, threat: str = "linf", progress: bool = True,
                       seed: int = 0) -> LoadedClassifier:
    """Load the base classifier named by ``spec`` (see the module docstring for the forms)."""
    kind, rest = _source(spec)
    loader = source_registry().get(kind)
    return loader(rest, dataset, artifacts=artifacts, data_root=data_root, threat=threat, progress=progress,
                  seed=seed)

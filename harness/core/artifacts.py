"""Trained artifacts (weights) cached under a hash of the recipe that produced them.

Weights are stored as safetensors, so loading one never executes code from it. Each artifact folder
holds ``weights.safetensors`` and ``recipe.json`` (the full recipe, plus provenance of the training run).
Writes go to a temporary folder that is renamed into place, so a crash never leaves half an artifact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from harness.core.errors import MissingArtifactError, UsageError
from harness.core.keys import RECIPE_KEY_LENGTH, content_hash
from harness.core.paths import artifact_root

log = logging.getLogger(__name__)


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    return content_hash(recipe, RECIPE_KEY_LENGTH)


@dataclass(frozen=True)
class Artifact:
    key: str
    path: Path
    recipe: dict[str, Any]

    def provenance(self) -> dict[str, Any]:
        """What was recorded when the artifact was trained (e.g. its training seconds); {} if nothing."""
        try:
            return json.loads((self.path / "provenance.json").read_text())
        except (OSError, ValueError):
            return {}

    def load(self) -> dict[str, torch.Tensor]:
        """The weights; a damaged file is a one-line :class:`UsageError` saying to delete the folder."""
        try:
            return load_file(str(self.path / "weights.safetensors"))
        except (SafetensorError, OSError) as exc:
            detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise UsageError(f"cached artifact {self.path} is damaged ({detail}); delete that folder and run "
                             f"again to retrain it") from None


class ArtifactCache:
    """``get_or_train(kind, recipe, producer)``: reuse a cached artifact, or produce and store it."""

    def __init__(self, root: str | os.PathLike | None = None, allow_train: bool = True):
        self.root = artifact_root(root)
        self.allow_train = allow_train

    def path_for(self, kind: str, recipe: Mapping[str, Any]) -> Path:
        return self.root / kind / recipe_hash(recipe)

    def find(self, kind: str, recipe: Mapping[str, Any]) -> Artifact | None:
        path = self.path_for(kind, recipe)
        if (path / "weights.safetensors").is_file():
            return Artifact(path.name, path, json.loads((path / "recipe.json").read_text()))
        return None

    def get_or_train(self, kind: str, recipe: Mapping[str, Any],
                     producer: Callable[[], dict[str, torch.Tensor]], what: str,
                     provenance: Callable[[], Mapping[str, Any]] | None = None) -> Artifact:
        """Return the artifact for ``recipe``; train it with ``producer`` if missing and allowed (and store
        what ``provenance()`` returns then beside it). Training holds the artifact's file lock, so
        processes needing the same artifact train it once."""
        found = self.find(kind, recipe)
        if found is not None:
            return found
        if not self.allow_train:
            raise MissingArtifactError(
                f"{what} is not trained yet (recipe {recipe_hash(recipe)} under {self.root / kind}); "
                f"run without --no-train, or train it with `harness train`")
        with self.lock(kind, recipe):
            found = self.find(kind, recipe)  # trained meanwhile by the process that held the lock
            if found is not None:
                return found
            log.info("training %s (recipe %s)", what, recipe_hash(recipe))
            started = time.time()
            state = producer()
            extra = dict(provenance()) if provenance is not None else {}
            return self.store(kind, recipe, state, {"seconds": round(time.time() - started, 1), **extra})

    def checkpoint_path(self, kind: str, recipe: Mapping[str, Any]) -> Path:
        """Where the training of ``recipe`` keeps its resumable state (``.checkpoints/<kind>/<hash>.pt``)."""
        return self.root / ".checkpoints" / kind / f"{recipe_hash(recipe)}.pt"

    def lock(self, kind: str, recipe: Mapping[str, Any]) -> FileLock:
        """The lock (``.locks/<kind>/<hash>.lock``, beside the artifact folders rather than among them)
        held while the artifact is trained: one process trains it."""
        path = self.root / ".locks" / kind / f"{recipe_hash(recipe)}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    def store(self, kind: str, recipe: Mapping[str, Any], state: Mapping[str, torch.Tensor],
              provenance: Mapping[str, Any] | None = None) -> Artifact:
        path = self.path_for(kind, recipe)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        try:
            tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(tensors, str(tmp / "weights.safetensors"))
            meta = {"recipe": dict(recipe), "provenance": dict(provenance or {})}
            (tmp / "recipe.json").write_text(json.dumps(meta["recipe"], indent=2, sort_keys=True, default=str))
            (tmp / "provenance.json").write_text(json.dumps(meta["provenance"], indent=2, default=str))
            if path.exists():  # a concurrent trainer won the race: keep its artifact
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return Artifact(path.name, path, dict(recipe))

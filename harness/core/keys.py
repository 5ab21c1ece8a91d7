"""The one way harness hashes things: canonical JSON, then sha256.

Cell keys (32 hex digits), artifact recipes (16) and analysis records (64) all hash the canonical JSON
of a mapping; modules and state dicts are fingerprinted by their bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["canonical_json", "content_hash", "module_fingerprint", "state_fingerprint",
           "CELL_KEY_LENGTH", "RECIPE_KEY_LENGTH"]

CELL_KEY_LENGTH = 32
RECIPE_KEY_LENGTH = 16


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the input of every hash in harness."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(obj: Any, length: int | None = None) -> str:
    """sha256 (hex, the first ``length`` digits; all 64 for ``None``) of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def module_fingerprint(model: nn.Module) -> str:
    """Content hash of a module: every submodule's type and settings, then every parameter and buffer
    (name, dtype, shape, values). Two modules with the same fingerprint compute the same function."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__module__}.{type(module).__qualname__}({module.extra_repr()});"
                      .encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(_bytes(tensor))
    return digest.hexdigest()[:16]


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (first 16 hex digits) over a state dict's names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(_bytes(tensor))
    return digest.hexdigest()[:16]


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

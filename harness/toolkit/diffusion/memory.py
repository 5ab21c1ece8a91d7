"""Memory held for backward, measured deterministically with ``saved_tensors_hooks``.

:func:`saved_for_backward` runs a function and adds up the storage bytes autograd saves for backward
(each storage once, model parameters excluded). Inside a non-reentrant checkpoint region the
checkpoint's own hooks take over, so what is counted there is what checkpointing really keeps.
"""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

import torch

__all__ = ["saved_for_backward"]

T = TypeVar("T")


def saved_for_backward(fn: Callable[[], T], exclude: Iterable[torch.Tensor] = ()) -> tuple[T, int]:
    """``(fn(), bytes saved for backward by it)``, not counting the storages of ``exclude``."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, sum(seen.values())

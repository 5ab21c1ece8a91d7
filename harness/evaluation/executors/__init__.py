"""Executors: how a cell's missing samples are computed once the driver has planned, claimed and opened
the cell. ``local`` evaluates its batches in this process; ``ray`` spreads them over a Ray cluster as
shards of samples. Either way the driver alone writes the store."""

from __future__ import annotations

from typing import Any

from harness.evaluation.executors.base import EXECUTORS, CellJob, Executor, ShardFailed, check_executor
from harness.evaluation.executors.local import LocalExecutor
from harness.evaluation.executors.ray import RayExecutor

__all__ = ["EXECUTORS", "CellJob", "Executor", "ShardFailed", "check_executor", "make_executor"]


def make_executor(name: str, *, address: str | None = None, registry: Any = None) -> Executor:
    """The executor called ``name`` (``local`` or ``ray``); ``address`` is the Ray cluster to join and
    ``registry`` the defense registry workers rebuild entries from (``None``: the installed one)."""
    check_executor(name, address)
    if name == "local":
        return LocalExecutor()
    return RayExecutor(address=address, registry=registry)

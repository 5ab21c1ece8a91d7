"""Executors: how a cell's missing samples are computed once the driver has planned, claimed and opened
the cell. ``local`` evaluates its batches in this process; ``ray`` spreads them over a Ray cluster as
shards of samples. Either way the driver alone writes the store."""

from __future__ import annotations

from harness.evaluation.executors.base import (EXECUTORS, CellJob, Executor, ShardFailed, check_executor,
                                               make_executor)

__all__ = ["EXECUTORS", "CellJob", "Executor", "ShardFailed", "check_executor", "make_executor"]

"""The executor contract: a :class:`CellJob` in (a planned, claimed, opened cell and its missing batches),
groups of :class:`~harness.evaluation.executors.batches.BatchResult` out, each group committed by the
driver as one transaction (a batch for ``local``, a shard for ``ray``)."""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from harness.core.devices import describe_device
from harness.core.errors import UsageError
from harness.evaluation.executors.batches import BatchResult, CellWork

__all__ = ["EXECUTORS", "RAY_INSTALL", "CellJob", "check_executor", "Executor", "ShardFailed"]

#: the valid ``--executor`` values
EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install 'harness[ray]'"


@dataclass(frozen=True)
class CellJob:
    """A cell's missing samples as batches (of ``--batch-size``) and three ways to get at the cell:
    ``local`` builds its :class:`CellWork` in this process, ``rebuild`` is the plain data a worker rebuilds
    it from with ``rebuild_with`` (the run request, the entry's name, the cell key; see
    :func:`harness.evaluation.runner.rebuild_cell_work`), and ``prepare`` builds (training if needed)
    here what the workers then only load."""

    key: str
    batches: list[list[int]]
    first: bool  # no sample of the cell is stored yet: its first batch runs the evaluation-quality checks
    local: Callable[[], CellWork]
    rebuild: dict[str, Any]
    prepare: Callable[[], None]
    #: the worker-side rebuild, ``(rebuild, registry, device) -> CellWork`` (the runner's
    #: ``rebuild_cell_work``, handed over so that executors never import the runner)
    rebuild_with: Callable[[dict[str, Any], Any, torch.device], CellWork]


class ShardFailed(RuntimeError):
    """A shard failed on every attempt; the cell fails with the shard's last error."""


class Executor(ABC):
    """Computes cells' batches; used as a context manager around one run."""

    name: str

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @abstractmethod
    def evaluate(self, job: CellJob) -> Iterator[list[BatchResult]]:
        """The results of ``job``'s batches, one committed group at a time (in any order). Raises
        :class:`ShardFailed` after the groups that did succeed, when one could not be computed."""

    @abstractmethod
    def device(self, spec: str) -> torch.device:
        """The device ``--device spec`` computes cells on (a one-line :class:`UsageError` if it is not there)."""

    def driver_device(self, device: torch.device) -> torch.device:
        """What this process runs models on when cells compute on ``device``."""
        return device

    def describe_device(self, spec: str) -> str:
        """The device cells compute on (and, beyond this process, where), for the run's provenance."""
        return describe_device(self.device(spec))


def check_executor(name: str, address: str | None) -> None:
    """A one-line :class:`UsageError` unless ``name`` is an executor that can run here, before anything
    is opened or stored."""
    if name not in EXECUTORS:
        raise UsageError(f"--executor {name!r} is not an executor; valid: {', '.join(EXECUTORS)}")
    if address and name != "ray":
        raise UsageError("--address is for --executor ray; the local executor runs in this process")
    if name == "ray" and importlib.util.find_spec("ray") is None:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}")

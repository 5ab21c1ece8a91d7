"""``--executor local``: the cell's batches one after another in this process, each its own group (so
an interrupted run resumes at the batch after the last committed one)."""

from __future__ import annotations

from typing import Iterator

import torch

from harness.core.devices import resolve_device
from harness.evaluation.executors.base import CellJob, Executor
from harness.evaluation.executors.batches import BatchResult, evaluate_batch

__all__ = ["LocalExecutor"]


class LocalExecutor(Executor):
    name = "local"

    def device(self, spec: str) -> torch.device:
        return resolve_device(spec)

    def evaluate(self, job: CellJob) -> Iterator[list[BatchResult]]:
        work = job.local()
        for number, batch in enumerate(job.batches):
            yield [evaluate_batch(work, batch, flags=job.first and number == 0)]

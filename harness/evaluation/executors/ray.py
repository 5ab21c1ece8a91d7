"""``--executor ray [--address ADDR]``: a cell's missing batches split into shards of samples, each a Ray
task declaring its resources (one CPU, and one GPU under ``--device cuda``), on the cluster at ``ADDR`` or
on a local Ray instance started for the run.

A worker rebuilds the cell from plain data (the run request, the entry's name, the cell key) through the
registry and the artifact cache, and returns per-sample rows: it never opens the results store. Before
the shards start, the driver has built the cell's defense (training its weights if needed) and its
transfer source, so workers only load artifacts. A shard that raises or whose worker dies is resubmitted
up to ``$HARNESS_SHARD_RETRIES`` times (default 2); after that the cell fails with the shard's error,
once every other shard of it has been stored, so a rerun computes only the shards that are missing.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from typing import Any, Callable, Iterator

import torch

from harness.core.devices import DEVICE_CHOICES
from harness.core.errors import UsageError
from harness.evaluation.executors.base import RAY_INSTALL, CellJob, Executor, ShardFailed
from harness.evaluation.executors.batches import BatchResult, CellWork, evaluate_batch

__all__ = ["RETRIES_ENV", "RayExecutor", "run_shard"]

log = logging.getLogger(__name__)
RETRIES_ENV = "HARNESS_SHARD_RETRIES"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def shard_retries() -> int:
    """How many times a failed shard is resubmitted: ``$HARNESS_SHARD_RETRIES`` (default 2)."""
    text = os.environ.get(RETRIES_ENV, "2")
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"${RETRIES_ENV} must be a whole number >= 0, got {text!r}")
    return value


def _error_line(exc: BaseException) -> str:
    """``Type: first line`` of what a shard raised (the task's own exception, not Ray's wrapper)."""
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def run_shard(spec: dict[str, Any], registry: Any, device: str, batches: list[list[int]],
              first: bool, rebuild: Callable[[dict[str, Any], Any, torch.device], CellWork]) -> list[BatchResult]:
    """The Ray task: rebuild the cell of ``spec`` on ``device`` with ``rebuild`` (the runner's
    ``rebuild_cell_work``) and evaluate the shard's ``batches`` (``first``: its first batch is the cell's
    first, and runs the evaluation-quality checks)."""
    torch.set_num_threads(1)  # the task declares one CPU
    work = rebuild(spec, registry, torch.device(device))
    return [evaluate_batch(work, batch, flags=first and number == 0) for number, batch in enumerate(batches)]


class RayExecutor(Executor):
    """Shards of a cell's batches as Ray tasks; results come back to the driver, which stores them."""

    name = "ray"

    def __init__(self, address: str | None = None, registry: Any = None):
        self._ray = _import_ray()
        self.address, self.registry = address, registry
        self.retries = shard_retries()
        self._started = False
        self._token = uuid.uuid4().hex  # workers keep what they rebuilt for this run only

    def __enter__(self) -> "RayExecutor":
        ray = self._ray
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UsageError(f"cannot start or join Ray{f' at {self.address}' if self.address else ''}: "
                                 f"{_error_line(exc)}") from None
            self._started = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def _resources(self) -> dict[str, float]:
        return self._ray.cluster_resources()

    def device(self, spec: str) -> torch.device:
        """Ray assigns each GPU shard its GPU, so only ``cpu``, ``cuda`` and ``auto`` are valid here."""
        text = str(spec).strip().lower()
        gpus = self._resources().get("GPU", 0)
        if text == "cpu":
            return torch.device("cpu")
        if text == "auto":
            return torch.device("cuda") if gpus else torch.device("cpu")
        if text == "cuda":
            if not gpus:
                raise UsageError("--device cuda: the Ray cluster has no GPU; valid here: cpu, auto")
            return torch.device("cuda")
        if text.startswith("cuda:"):
            raise UsageError(f"--device {spec}: Ray assigns GPUs to shards itself; valid with --executor ray: "
                             f"cpu, cuda, auto")
        raise UsageError(f"--device {spec!r} is not a device; valid: {DEVICE_CHOICES}")

    def driver_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu")  # the driver builds and trains; the workers compute

    def describe_device(self, spec: str) -> str:
        device = self.device(spec)
        where = self.address or "local"
        if device.type == "cuda":
            return f"cuda (Ray {where}: {int(self._resources().get('GPU', 0))} GPUs, 1 per shard)"
        return f"cpu (Ray {where}: {int(self._resources().get('CPU', 0))} CPUs, 1 thread per shard)"

    def _shards(self, job: CellJob, gpu: bool) -> list[list[list[int]]]:
        """The job's batches as contiguous shards: as many as the cluster runs at once (at least one batch
        each), so a cell keeps every slot busy."""
        slots = max(1, int(self._resources().get("GPU" if gpu else "CPU", 1)))
        per = max(1, math.ceil(len(job.batches) / slots))
        return [job.batches[i:i + per] for i in range(0, len(job.batches), per)]

    def evaluate(self, job: CellJob) -> Iterator[list[BatchResult]]:
        if not job.batches:
            return
        ray = self._ray
        device = job.rebuild["request"].device
        gpu = self.device(device).type == "cuda"
        job.prepare()
        task = ray.remote(run_shard).options(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=0)
        spec, registry = ray.put(dict(job.rebuild, run=self._token)), ray.put(self.registry)
        target = "cuda" if gpu else "cpu"
        shards = self._shards(job, gpu)

        def submit(number: int) -> Any:
            return task.remote(spec, registry, target, shards[number], job.first and number == 0,
                               job.rebuild_with)

        pending = {submit(number): (number, 0) for number in range(len(shards))}
        failures: list[str] = []
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                number, attempt = pending.pop(ref)
                try:
                    results = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    error = _error_line(exc)
                    if attempt < self.retries:
                        log.warning("cell %s: shard %d failed (%s); retrying (%d of %d)", job.key, number, error,
                                    attempt + 1, self.retries)
                        pending[submit(number)] = (number, attempt + 1)
                    else:
                        failures.append(f"shard {number + 1} of {len(shards)} failed {attempt + 1} times, "
                                        f"last: {error}")
                    continue
                yield results
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
        if failures:
            raise ShardFailed("; ".join(failures))

"""Benchmark: harness PGD against a raw loop doing exactly the same network work, on one model and one batch.

harness attacks only the points the defense classifies correctly, and a restart only the points still
standing (AutoAttack's bookkeeping), so PGD-10 with 2 restarts does fewer sample forward+backward passes
than ``points x steps x restarts``. Around the attack, the protocol makes gradient-free passes: the clean
prediction and the final evaluation (and PGD a check before a restart, when some point still stands). The
fixture runs the attack once through a classifier that records every call: its input images and its mode
(with gradients, ``no_grad``, ``inference_mode``). ``test_bench_raw_same_passes`` replays exactly those
calls, in order, on the recorded images, as bare ``model`` passes (a gradient call: forward, summed
cross-entropy, ``autograd.grad`` to the input). What is left to harness is its own work: random starts,
steps, projection, bookkeeping, the noise objects. So

* overhead per pass = mean(test_bench_pgd) / mean(test_bench_raw_same_passes) - 1 (goal <= 5%);
* saving from early stopping = 1 - counted gradient passes / (points x steps x restarts), in each
  benchmark's ``extra_info``, and in time 1 - mean(test_bench_raw_same_passes) / mean(test_bench_raw_all_passes)
  (the latter replays the same gradient-free calls, and every point in every step and restart).

Run with timing: ``pytest -p no:xdist tests/test_bench_pgd.py --benchmark-enable``; in the normal suite
each runs once, untimed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.attacks.base import Target
from harness.attacks.pgd import PGD
from harness.core.entry import Defense, DefenseEntry, Kind
from harness.core.threat import Epsilon, ThreatModel
from harness.evaluation.protocols import AdaptiveFixed, BatchResult

from conftest import bench_model

STEPS, RESTARTS, BATCH = 10, 2, 128
ENTRY = DefenseEntry(name="bench", version="1", kind=Kind.CLASSIFIER, paper="p", citation="c",
                     build=lambda ctx: None)


#: a recorded call: the images the classifier got and the mode it ran in
Call = tuple[torch.Tensor, str]


def _mode() -> str:
    """The autograd mode of the current call."""
    if torch.is_inference_mode_enabled():
        return "inference"
    return "grad" if torch.is_grad_enabled() else "no_grad"


class _Counted(nn.Module):
    """The classifier, recording every call it gets (a copy of its images, and its mode)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[Call] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.detach().clone(), _mode()))
        return self.model(x)


@pytest.fixture(scope="module")
def bench() -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[Call]]:
    """The model, a batch whose labels it gets right on about half the points, and every call harness's
    run of PGD makes to it."""
    model, x, _ = bench_model(BATCH)
    with torch.no_grad():
        y = model(x).argmax(1)
    wrong = torch.arange(BATCH) % 2 == 1
    y[wrong] = (y[wrong] + 1) % 10
    counted = _Counted(model)
    _run(Defense(counted), x, y)
    return model, x, y, counted.calls


def _run(defense: Defense, x: torch.Tensor, y: torch.Tensor) -> BatchResult:
    attack = PGD(ThreatModel("linf", Epsilon.parse("8/255")), steps=STEPS, restarts=RESTARTS)
    return AdaptiveFixed().run(ENTRY, defense, attack, x, y, torch.arange(len(x)), 0)


def _rows(calls: list[Call], grad: bool = True) -> list[int]:
    """The rows of each call made with gradients (``grad=False``: of each gradient-free call)."""
    return [len(images) for images, mode in calls if (mode == "grad") == grad]


def _record(benchmark, calls: list[Call]) -> None:
    full, passes = BATCH * STEPS * RESTARTS, sum(_rows(calls))
    benchmark.extra_info.update(passes=passes, full_passes=full, early_stopping_saving=1 - passes / full,
                                gradient_free_rows=_rows(calls, False))


@pytest.mark.benchmark(group="pgd-vs-raw")
def test_bench_pgd(benchmark, bench):
    model, x, y, calls = bench
    result = benchmark(_run, Defense(model), x, y)
    _record(benchmark, calls)
    assert (result.x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert BATCH // 2 * STEPS <= sum(_rows(calls)) < BATCH * STEPS  # only the correct half, restarts for survivors


def _raw(model: nn.Module, calls: list[Call], y: torch.Tensor) -> None:
    """Each call as a bare pass of ``model`` on its images, in its mode (labels: the batch's first rows;
    the loss costs the same whatever they are)."""
    for images, mode in calls:
        if mode == "grad":
            x_var = images.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(x_var), y[:len(images)], reduction="sum"), x_var)
        else:
            with torch.inference_mode(mode == "inference"), torch.no_grad():
                model(images)


@pytest.mark.benchmark(group="pgd-vs-raw")
def test_bench_raw_same_passes(benchmark, bench):
    model, _, y, calls = bench
    benchmark(_raw, model, calls, y)
    _record(benchmark, calls)


@pytest.mark.benchmark(group="pgd-vs-raw")
def test_bench_raw_all_passes(benchmark, bench):
    """What attacking every point in every step and restart would cost (no early stopping), with the same
    gradient-free calls."""
    model, x, y, calls = bench
    every = [call for call in calls if call[1] != "grad"] + [(x, "grad")] * (STEPS * RESTARTS)
    benchmark(_raw, model, every, y)
    _record(benchmark, calls)


def test_recorded_calls(bench):
    """The record is of real passes: the protocol's clean pass and final evaluation around the attack, and
    in between exactly the calls a target that counts rows sees, all with gradients (every point fell in
    the first restart, so there is no check before a second one)."""
    model, x, y, calls = bench
    assert [len(images) for images, _ in calls[:1] + calls[-1:]] == _rows(calls, False)
    assert calls[0][1] == "no_grad" and calls[-1][1] == "inference"  # inference mode once known to be safe
    seen = []
    target = Target(lambda images, indices: seen.append(len(images)) or model(images))
    attack = PGD(ThreatModel("linf", Epsilon.parse("8/255")), steps=STEPS, restarts=RESTARTS)
    correct = model(x).argmax(1) == y
    attack.perturb(target, x[correct], y[correct], torch.arange(BATCH)[correct], 0)
    assert seen == _rows(calls) == [int(correct.sum())] * STEPS

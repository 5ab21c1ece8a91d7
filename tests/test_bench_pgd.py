"""Benchmark: harness PGD against a raw loop doing exactly the same work, on one model and one batch.

harness attacks only the points the defense classifies correctly, and a restart only the points still
standing (AutoAttack's bookkeeping), so PGD-10 with 2 restarts does fewer sample forward+backward passes
than ``points x steps x restarts``. The fixture runs the attack once, counting the rows of every gradient
call; ``test_bench_raw_same_passes`` replays exactly those calls (same row counts, same order) as bare
``model`` forward+backward passes. So

* overhead per pass = mean(test_bench_pgd) / mean(test_bench_raw_same_passes) - 1 (goal <= 5%);
* saving from early stopping = 1 - counted passes / (points x steps x restarts), in each benchmark's
  ``extra_info``, and in time mean(test_bench_raw_same_passes) / mean(test_bench_raw_all_passes).

Run with timing: ``pytest -p no:xdist tests/test_bench_pgd.py --benchmark-enable``; in the normal suite
each runs once, untimed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.attacks.base import Target
from harness.attacks.pgd import PGD
from harness.core.entry import Defense, DefenseEntry, Kind
from harness.core.threat import Epsilon, ThreatModel
from harness.evaluation.protocols import AdaptiveFixed

from conftest import bench_model

STEPS, RESTARTS, BATCH = 10, 2, 128
ENTRY = DefenseEntry(name="bench", version="1", kind=Kind.CLASSIFIER, paper="p", citation="c",
                     build=lambda ctx: None)


class _Counted(Defense):
    """The defense, recording the rows of every call made with gradients (one pass per row)."""

    def __init__(self, model):
        super().__init__(model)
        self.rows: list[int] = []

    def forward(self, x, noise):
        if torch.is_grad_enabled():
            self.rows.append(len(x))
        return super().forward(x, noise)


@pytest.fixture(scope="module")
def bench():
    """The model, a batch whose labels it gets right on about half the points, and the rows of each
    gradient call harness's PGD makes on it."""
    model, x, gen = bench_model(BATCH)
    with torch.no_grad():
        y = model(x).argmax(1)
    wrong = torch.arange(BATCH) % 2 == 1
    y[wrong] = (y[wrong] + 1) % 10
    counted = _Counted(model)
    _run(counted, x, y)
    return model, x, y, counted.rows


def _run(defense, x, y):
    attack = PGD(ThreatModel("linf", Epsilon.parse("8/255")), steps=STEPS, restarts=RESTARTS)
    return AdaptiveFixed().run(ENTRY, defense, attack, x, y, torch.arange(len(x)), 0)


def _record(benchmark, rows):
    full = BATCH * STEPS * RESTARTS
    benchmark.extra_info.update(passes=sum(rows), full_passes=full, early_stopping_saving=1 - sum(rows) / full)


@pytest.mark.benchmark(group="pgd-vs-raw")
def test_bench_pgd(benchmark, bench):
    model, x, y, rows = bench
    result = benchmark(_run, Defense(model), x, y)
    _record(benchmark, rows)
    assert (result.x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert BATCH // 2 * STEPS <= sum(rows) < BATCH * STEPS  # only the correct half, restarts for survivors


def _raw(model, x, y, rows):
    for n in rows:
        x_var = x[:n].detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(x_var), y[:n], reduction="sum"), x_var)


@pytest.mark.benchmark(group="pgd-vs-raw")
def test_bench_raw_same_passes(benchmark, bench):
    model, x, y, rows = bench
    benchmark(_raw, model, x, y, rows)
    _record(benchmark, rows)


@pytest.mark.benchmark(group="pgd-vs-raw")
def test_bench_raw_all_passes(benchmark, bench):
    """What attacking every point in every step and restart would cost (no early stopping)."""
    model, x, y, rows = bench
    benchmark(_raw, model, x, y, [BATCH] * STEPS * RESTARTS)
    _record(benchmark, rows)


def test_counted_target_sees_every_pass(bench):
    """The count is of real passes: a target that counts rows agrees with the fixture's record."""
    model, x, y, rows = bench
    seen = []
    target = Target(lambda images, indices: seen.append(len(images)) or model(images))
    attack = PGD(ThreatModel("linf", Epsilon.parse("8/255")), steps=STEPS, restarts=RESTARTS)
    correct = model(x).argmax(1) == y
    attack.perturb(target, x[correct], y[correct], torch.arange(BATCH)[correct], 0)
    assert seen[:STEPS] + seen[STEPS + 1:] == rows  # call STEPS is the gradient-free check before the restart

"""Benchmark: AutoAttack through harness against the autoattack library called directly, on one model and
one batch: the same adversarial images (so the same robust accuracy per sample), and the time ratio
mean(test_bench_harness_autoattack) / mean(test_bench_library_autoattack) (goal <= 1.10).

Run with timing: ``pytest -p no:xdist tests/test_bench_autoattack.py --benchmark-enable``; in the normal
suite each runs once, untimed.
"""

from __future__ import annotations

import pytest
import torch

from harness.attacks.autoattack import AutoAttackAdapter
from harness.attacks.base import Target
from harness.core.threat import Epsilon, ThreatModel

from conftest import bench_model

BATCH, SEED = 32, 0
THREAT = ThreatModel("linf", Epsilon.parse("8/255"))
EPS = THREAT.eps.value


@pytest.fixture(scope="module")
def bench():
    model, x, gen = bench_model(BATCH)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point starts correct, so every point is attacked
    return model, x, y


def _harness(model, x, y):
    attack = AutoAttackAdapter(THREAT, version="standard")
    return attack.perturb(Target(lambda images, indices: model(images)), x, y, torch.arange(len(x)), SEED)


def _library(model, x, y):
    from pyautoattack import AutoAttack

    attack = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=SEED, device=x.device)
    attack.verbose = False
    with torch.random.fork_rng():
        x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=256)
    return x_adv


@pytest.mark.benchmark(group="autoattack-vs-library")
def test_bench_harness_autoattack(benchmark, bench):
    model, x, y = bench
    x_adv = benchmark.pedantic(_harness, args=(model, x, y), rounds=3, iterations=1)
    with torch.no_grad():
        robust = model(x_adv).argmax(1) == y
    benchmark.extra_info["robust_accuracy"] = float(robust.float().mean())
    assert torch.equal(x_adv, _library(model, x, y))  # the same images, so the same result per sample


@pytest.mark.benchmark(group="autoattack-vs-library")
def test_bench_library_autoattack(benchmark, bench):
    model, x, y = bench
    x_adv = benchmark.pedantic(_library, args=(model, x, y), rounds=3, iterations=1)
    with torch.no_grad():
        benchmark.extra_info["robust_accuracy"] = float((model(x_adv).argmax(1) == y).float().mean())

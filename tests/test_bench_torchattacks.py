"""Benchmark: harness PGD against torchattacks' PGD (``torchattacks.PGD``), the same work on one model and
one batch: PGD-10, l_inf 8/255, step 2/255, random start, every point in every step (harness's
:meth:`PGD.perturb` is called directly, so no point is skipped). The ratio is
mean(test_bench_harness_pgd) / mean(test_bench_torchattacks_pgd).

torchattacks drags torchvision and ships its own ``robustbench`` package, so it lives in a separate venv::

    python -m venv /tmp/ta-venv
    /tmp/ta-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 torchattacks pytest pytest-benchmark
    PYTHONPATH=. /tmp/ta-venv/bin/python -m pytest -p no:xdist -p no:cacheprovider \\
        tests/test_bench_torchattacks.py --benchmark-enable

(these modules of harness import only torch); elsewhere the tests skip.
"""

from __future__ import annotations

import pytest
import torch

from harness.attacks.base import Target
from harness.attacks.pgd import PGD
from harness.core.threat import Epsilon, ThreatModel

from conftest import bench_model

torchattacks = pytest.importorskip("torchattacks")

STEPS, BATCH = 10, 128
THREAT = ThreatModel("linf", Epsilon.parse("8/255"))


@pytest.fixture(scope="module")
def bench():
    model, x, gen = bench_model(BATCH)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    return model, x, y


@pytest.mark.benchmark(group="pgd-vs-torchattacks")
def test_bench_harness_pgd(benchmark, bench):
    model, x, y = bench
    attack = PGD(THREAT, steps=STEPS, step_size=THREAT.eps.value / 4)
    x_adv = benchmark(attack.perturb, Target(lambda images, indices: model(images)), x, y, torch.arange(BATCH), 0)
    assert (x_adv - x).abs().max() <= THREAT.eps.value + 1e-6


@pytest.mark.benchmark(group="pgd-vs-torchattacks")
def test_bench_torchattacks_pgd(benchmark, bench):
    model, x, y = bench
    attack = torchattacks.PGD(model, eps=THREAT.eps.value, alpha=THREAT.eps.value / 4, steps=STEPS, random_start=True)
    x_adv = benchmark(attack, x, y)
    assert (x_adv - x).abs().max() <= THREAT.eps.value + 1e-6

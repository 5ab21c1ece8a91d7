"""Benchmark: harness PGD throughput vs the raw cost of the same number of forward+backward passes.

Run with timing: ``pytest tests/test_bench_pgd.py --benchmark-enable``; the ratio of the two means
is PGD's overhead (bookkeeping, projection, random start). In the normal suite they run once, untimed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.attacks.base import Target
from harness.attacks.pgd import PGD
from harness.classifiers.architectures import build_classifier
from harness.core.threat import Epsilon, ThreatModel

STEPS, BATCH = 10, 128


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_classifier("convnet-small", 10).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand((BATCH, 3, 32, 32), generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    return model, x, y


@pytest.mark.benchmark(group="pgd-vs-raw")
def test_bench_pgd(benchmark, batch):
    model, x, y = batch
    attack = PGD(ThreatModel("linf", Epsilon.parse("8/255")), steps=STEPS)
    target = Target(lambda images, indices: model(images))
    x_adv = benchmark(attack.perturb, target, x, y, torch.arange(BATCH), 0)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6


@pytest.mark.benchmark(group="pgd-vs-raw")
def test_bench_raw_forward_backward(benchmark, batch):
    model, x, y = batch

    def raw():
        for _ in range(STEPS):
            x_var = x.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(x_var), y, reduction="sum"), x_var)

    benchmark(raw)

"""Benchmark: exact gradients through unrolled diffusion purifiers, with and without checkpointing.

Memory is the number of bytes autograd keeps for backward (deterministic, see
:mod:`harness.toolkit.diffusion.memory`), stored in the benchmark's ``extra_info``; with timing enabled
(``pytest tests/test_bench_checkpointing.py --benchmark-enable``) the time per gradient is measured too.
Every purifier checkpoints through :func:`harness.toolkit.diffusion.sampler.checkpointed`.

Measured when written (tiny UNet, 4 images of 3x32x32):

* DiffPure, 5 / 10 / 20 reverse steps: checkpointed 0.54 / 1.03 / 2.02 MB (the per-step inputs, ~2
  images per step), un-checkpointed 32.7 / 65.4 / 130.8 MB. With the ``small`` UNet (32/64/64) and one
  image: 0.13 / 0.25 / 0.48 MiB vs 30.7 / 61.4 / 122.8 MiB, for 1.4-1.7x the time of a plain gradient
  (one extra UNet forward per step).
* ScoreOpt-O, 2 / 8 Adam iterations (second order through the UNet): checkpointed 0.42 / 1.55 MiB,
  un-checkpointed 40.3 / 160.9 MiB; ``small`` UNet, one image: 0.11 / 0.39 MiB vs 38.9 / 155.5 MiB,
  for 1.9-2.4x the time (the inner gradient recomputes the UNet forward once more).
* ADP, 2 / 8 steps (two UNet calls each): checkpointed 0.19 / 0.47 MiB, un-checkpointed 25.3 /
  101.0 MiB; ``small`` UNet, one image: 0.05 / 0.12 MiB vs 24.7 / 98.5 MiB, 1.4-1.7x the time.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from defenses.adp import ADP
from defenses.diffpure import DiffPure
from defenses.scoreopt import ScoreOptO
from harness.toolkit.diffusion import DiffusionPurifier, LoadedUNet, build_unet, ddpm_preset, make_scheduler
from harness.toolkit.diffusion.memory import saved_for_backward
from harness.core.noise import FixedNoise

SHAPE, BATCH = (3, 32, 32), 4

PURIFIERS: dict[str, Callable[[LoadedUNet, int, bool], DiffusionPurifier]] = {
    "diffpure": lambda loaded, n, ckpt: DiffPure(loaded, tstar=1.0, steps=n, use_checkpoint=ckpt,
                                                 batch_invariant=False),
    "scoreopt-o": lambda loaded, n, ckpt: ScoreOptO(loaded, tstar=0.2, iters=n, lr=0.01, use_checkpoint=ckpt,
                                                    batch_invariant=False),
    "adp": lambda loaded, n, ckpt: ADP(loaded, sigma=0.25, steps=n, step_scale=0.05, score_sigma=0.25, stop=0.0,
                                       use_checkpoint=ckpt, batch_invariant=False),
}


@pytest.fixture(scope="module")
def loaded() -> LoadedUNet:
    config = ddpm_preset("tiny")
    unet = build_unet(config["unet"], SHAPE).eval().requires_grad_(False)
    return LoadedUNet(unet, make_scheduler(config["schedule"]), {"source": "test"})


def _gradient_bytes(loaded: LoadedUNet, steps: int, use_checkpoint: bool, name: str = "diffpure") -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        purifier = PURIFIERS[name](loaded, steps, use_checkpoint)
        x = torch.rand((BATCH, *SHAPE), generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        out, held = saved_for_backward(lambda: purifier(x, FixedNoise(0).draws(range(BATCH))),
                                       exclude=loaded.unet.parameters())
        torch.autograd.grad(out.sum(), x)
        return held
    finally:
        torch.set_num_threads(threads)


@pytest.mark.benchmark(group="diffpure-exact-gradient")
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_bench_checkpointed_gradient(benchmark, loaded, steps):
    held = benchmark.pedantic(_gradient_bytes, args=(loaded, steps, True), rounds=1, iterations=1)
    benchmark.extra_info["saved_bytes"] = held
    image_bytes = BATCH * 3 * 32 * 32 * 4
    assert held <= 3 * steps * image_bytes  # only the step inputs: no UNet activations


@pytest.mark.benchmark(group="diffpure-exact-gradient")
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_bench_plain_gradient(benchmark, loaded, steps):
    """The same gradient without checkpointing: every UNet activation of every step is kept."""
    held = benchmark.pedantic(_gradient_bytes, args=(loaded, steps, False), rounds=1, iterations=1)
    benchmark.extra_info["saved_bytes"] = held
    assert held > 10 * 3 * steps * BATCH * 3 * 32 * 32 * 4


@pytest.mark.benchmark(group="scoreopt-exact-gradient")
@pytest.mark.parametrize("iters", [2, 5])
def test_bench_scoreopt_checkpointed_gradient(benchmark, loaded, iters):
    held = benchmark.pedantic(_gradient_bytes, args=(loaded, iters, True, "scoreopt-o"), rounds=1, iterations=1)
    benchmark.extra_info["saved_bytes"] = held
    image_bytes = BATCH * 3 * 32 * 32 * 4
    assert held <= 6 * iters * image_bytes  # the Adam state (v, m, s, eps) per iteration: no UNet activations


@pytest.mark.parametrize("name", list(PURIFIERS))
def test_checkpointing_saves_memory(loaded, name):
    few, many = (5, 20) if name == "diffpure" else (2, 8)
    plain = {s: _gradient_bytes(loaded, s, False, name) for s in (few, many)}
    checkpointed = {s: _gradient_bytes(loaded, s, True, name) for s in (few, many)}
    assert plain[many] > 0.85 * (many / few) * plain[few]  # grows with the number of steps
    assert checkpointed[many] * 20 < plain[many]

"""Benchmark: exact gradients through a DiffPure sampler at 5, 10 and 20 reverse steps.

Memory is the number of bytes autograd keeps for backward (deterministic, see
:mod:`harness.diffusion.memory`), stored in the benchmark's ``extra_info``; with timing enabled
(``pytest tests/test_bench_checkpointing.py --benchmark-enable``) the time per gradient is measured too.
Measured when written (tiny UNet, 4 images of 3x32x32): checkpointed 0.54 / 1.03 / 2.02 MB (the
per-step inputs, ~2 images per step), un-checkpointed 32.7 / 65.4 / 130.8 MB. With the ``small``
UNet (32/64/64) and one image: 0.13 / 0.25 / 0.48 MiB vs 30.7 / 61.4 / 122.8 MiB, for 1.4-1.7x the
time of a plain gradient (one extra UNet forward per step).
"""

from __future__ import annotations

import pytest
import torch

from defenses.diffpure import DiffPure
from harness.diffusion import LoadedUNet, build_unet, ddpm_preset, make_scheduler
from harness.diffusion.memory import saved_for_backward
from harness.noise import FixedNoise

SHAPE, BATCH = (3, 32, 32), 4


@pytest.fixture(scope="module")
def loaded() -> LoadedUNet:
    config = ddpm_preset("tiny")
    unet = build_unet(config["unet"], SHAPE).eval().requires_grad_(False)
    return LoadedUNet(unet, make_scheduler(config["schedule"]), {"source": "test"})


def _gradient_bytes(loaded: LoadedUNet, steps: int, use_checkpoint: bool) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        purifier = DiffPure(loaded, tstar=1.0, steps=steps, use_checkpoint=use_checkpoint, batch_invariant=False)
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


def test_checkpointing_saves_memory(loaded):
    plain = {s: _gradient_bytes(loaded, s, False) for s in (5, 20)}
    checkpointed = {s: _gradient_bytes(loaded, s, True) for s in (5, 20)}
    assert plain[20] > 3.5 * plain[5]  # grows with the number of steps
    assert checkpointed[20] * 20 < plain[20]

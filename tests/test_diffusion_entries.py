"""Every diffusion purifier entry: randomness from its NoiseDraws only, batch invariance, gradients."""

from __future__ import annotations

import pytest
import torch

from defenses.dda import DDA_ENTRY, low_pass
from defenses.diffpure import DIFFPURE
from defenses.mimicdiffusion import MIMICDIFFUSION
from defenses.scoreopt import SCOREOPT_N, SCOREOPT_O
from harness.context import BuildContext
from harness.data import dataset_info
from harness.diffusion import build_unet, ddpm_preset
from harness.noise import FixedNoise
from harness.registry import default_registry

ENTRIES = (DIFFPURE, DDA_ENTRY, MIMICDIFFUSION, SCOREOPT_O, SCOREOPT_N)
INFO = dataset_info("cifar10")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(entry, **options):
    state = build_unet(ddpm_preset("tiny")["unet"], INFO.image_shape, seed=1).state_dict()
    ctx = BuildContext(entry_name=entry.name, dataset=INFO, classifier=torch.nn.Flatten(), preset="tiny",
                       config=entry.preset_config("tiny"), options=options, weights=lambda: state)
    return entry.build(ctx).eval()


def images(n: int) -> torch.Tensor:
    return torch.rand((n, *INFO.image_shape), generator=torch.Generator().manual_seed(0))


def test_entries_are_registered_and_stochastic():
    names = set(default_registry(reload=True).names())
    for entry in ENTRIES:
        assert entry.name in names and entry.stochastic and entry.differentiable
        assert {"small", "paper"} <= set(entry.presets)


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_fixed_noise_is_reproducible_batch_invariant_and_private(entry):
    defense = build(entry)
    x, noise = images(3), FixedNoise(11)
    before = torch.get_rng_state()
    with torch.no_grad():
        full = defense.purify(x, noise.draws([5, 6, 7]))
        alone = defense.purify(x[1:2], noise.draws([6]))
        reordered = defense.purify(x[[2, 0, 1]], noise.draws([7, 5, 6]))
        other = defense.purify(x, FixedNoise(12).draws([5, 6, 7]))
    assert torch.equal(before, torch.get_rng_state())
    assert torch.equal(full[1:2], alone) and torch.equal(full[[2, 0, 1]], reordered)
    assert not torch.equal(full, other)
    assert full.min() >= 0 and full.max() <= 1


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_exact_gradient_reaches_the_input(entry):
    defense = build(entry)
    x = images(2).requires_grad_(True)
    out = defense.purify(x, FixedNoise(0).draws([0, 1]))
    grad = torch.autograd.grad(out.pow(2).sum(), x)[0]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("entry", (DDA_ENTRY, MIMICDIFFUSION), ids=lambda e: e.name)
def test_guided_checkpointing_matches_plain(entry):
    grads = []
    for checkpoint in (True, False):
        defense = build(entry, checkpoint=checkpoint)
        x = images(2).requires_grad_(True)
        out = defense.purify(x, FixedNoise(0).draws([0, 1]))
        grads.append(torch.autograd.grad(out.sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_low_pass_is_a_projection():
    x = images(2)
    once = low_pass(x, 4)
    torch.testing.assert_close(low_pass(once, 4), once)
    assert once.shape == x.shape

"""NoiseSource: fixed randomness is per sample and survives re-batching; fresh is new per call."""

import torch

from harness.core.noise import FixedNoise, FreshNoise, noise_source


def test_fixed_noise_is_per_sample_and_batch_independent():
    source = FixedNoise(seed=3)
    full = source.draws([0, 1, 2, 3])
    a1, a2 = full.randn((3, 4, 4)), full.rand((2,))
    part = source.draws([2, 0])
    b1, b2 = part.randn((3, 4, 4)), part.rand((2,))
    assert torch.equal(b1[0], a1[2]) and torch.equal(b1[1], a1[0])
    assert torch.equal(b2[0], a2[2])
    again = source.draws([0, 1, 2, 3]).randn((3, 4, 4))
    assert torch.equal(again, a1)


def test_fixed_noise_differs_between_samples_draws_and_seeds():
    d = FixedNoise(seed=0).draws([0, 1])
    first, second = d.randn((8,)), d.randn((8,))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first, second)
    other = FixedNoise(seed=1).draws([0, 1]).randn((8,))
    assert not torch.equal(first, other)


def test_fresh_noise_changes_per_call_but_is_reproducible_from_seed():
    s1, s2 = FreshNoise(5), FreshNoise(5)
    x1, x2 = s1.draws([0, 1]).randn((4,)), s1.draws([0, 1]).randn((4,))
    assert not torch.equal(x1, x2)
    assert torch.equal(x1, s2.draws([0, 1]).randn((4,)))


def test_noise_sources_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    FixedNoise(0).draws([0, 1]).randn((16,))
    FreshNoise(0).draws([0, 1]).rand((16,))
    assert torch.equal(state, torch.random.get_rng_state())


def test_noise_source_by_name():
    assert noise_source("fixed", 1).describe()["kind"] == "fixed"
    assert noise_source("fresh", 1).describe()["kind"] == "fresh"
    try:
        noise_source("global", 1)
    except ValueError as exc:
        assert "fixed, fresh" in str(exc)
    else:
        raise AssertionError("unknown kind accepted")

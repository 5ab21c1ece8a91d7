"""Protocols for stochastic defenses: fixed-randomness adaptive vs BPDA, and adaptive-EOT."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from defenses.diffpure import DIFFPURE, DiffPure
from harness.attacks.pgd import PGD
from harness.toolkit.diffusion import LoadedUNet, build_unet, ddpm_preset, make_scheduler
from harness.core.errors import UsageError
from harness.core.noise import FixedNoise
from harness.evaluation.protocols import get_protocol, protocol_registry
from harness.core.entry import Defense
from harness.core.threat import Epsilon, ThreatModel

SHAPE = (3, 16, 16)
N = 16


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    """A tiny DiffPure whose UNet output is scaled up (an untrained UNet is nearly silent, which
    would make the purifier almost affine and BPDA's identity backward almost exact) in front of a
    tiny classifier; labels are the defense's own clean predictions, so every point starts correct."""
    config = ddpm_preset("tiny")
    unet = build_unet(config["unet"], SHAPE, seed=0).eval().requires_grad_(False)
    unet.conv_out.weight.mul_(10)
    loaded = LoadedUNet(unet, make_scheduler(config["schedule"]), {"source": "test"})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        classifier = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                   nn.Linear(16 * 16 * 16, 10))
    classifier[0].weight.data.mul_(3)
    classifier[3].weight.data.mul_(20)
    classifier.eval().requires_grad_(False)
    defense = Defense(classifier, DiffPure(loaded, tstar=0.2, steps=2, batch_invariant=False)).eval()
    x = torch.rand((N, *SHAPE), generator=torch.Generator().manual_seed(0))
    indices = torch.arange(N)
    with torch.no_grad():
        y = defense(x, FixedNoise(0).draws(indices)).argmax(1)
    return defense, x, y, indices


def _robust(protocol: str, setup, attack) -> float:
    defense, x, y, indices = setup
    result = get_protocol(protocol).run(DIFFPURE, defense, attack, x, y, indices, 0)
    return (result.adv_pred == y).float().mean().item()


def test_fixed_randomness_attack_at_least_as_strong_as_bpda(setup):
    attack = PGD(ThreatModel("linf", Epsilon.parse("2/255")), steps=10)
    adaptive, bpda = _robust("adaptive", setup, attack), _robust("bpda", setup, attack)
    assert adaptive <= bpda
    assert adaptive < bpda  # on this setup exact gradients win clearly (0.375 vs 0.75 when written)


def test_bpda_is_straight_through(setup):
    defense, x, _, indices = setup
    target = get_protocol("bpda").target(DIFFPURE, defense, seed=0)
    assert target.index_dependent
    weights = torch.randn((N, 10), generator=torch.Generator().manual_seed(1))
    x_var = x.clone().requires_grad_(True)
    grad = torch.autograd.grad((target(x_var, indices) * weights).sum(), x_var)[0]
    with torch.no_grad():
        purified = defense.purify(x, FixedNoise(0).draws(indices))
    p_var = purified.clone().requires_grad_(True)
    expected = torch.autograd.grad((defense.classifier(p_var) * weights).sum(), p_var)[0]
    torch.testing.assert_close(grad, expected)


def test_adaptive_eot_fresh_evaluation_and_worst_of_n(setup):
    defense, x, y, indices = setup
    attack = PGD(ThreatModel("linf", Epsilon.parse("2/255")), steps=2, eot=2)
    before = torch.get_rng_state()
    protocol = get_protocol("adaptive-eot")
    first = protocol.run(DIFFPURE, defense, attack, x[:6], y[:6], indices[:6], 0)
    again = protocol.run(DIFFPURE, defense, attack, x[:6], y[:6], indices[:6], 0)
    assert torch.equal(before, torch.get_rng_state())
    assert torch.equal(first.x_adv, again.x_adv) and first.extra == again.extra
    assert len(first.extra) == 6
    for row, pred, label in zip(first.extra, first.adv_pred, y[:6]):
        assert row["worst_of"] == protocol.worst_of and 0 <= row["adv_correct_draws"] <= protocol.worst_of
        if row["adv_correct_draws"] == protocol.worst_of:
            assert pred == label
    assert (first.x_adv - x[:6]).abs().max() <= 2 / 255 + 1e-6


def test_protocol_registry_and_checks():
    assert {"non-adaptive", "adaptive", "adaptive-eot", "bpda"} <= set(protocol_registry().names())
    opaque = dataclasses.replace(DIFFPURE, differentiable=False)
    with pytest.raises(UsageError, match="not differentiable"):
        get_protocol("adaptive-eot").check(opaque)
    get_protocol("bpda").check(opaque)


def test_fixed_randomness_protocols_run_eot_once(setup):
    """Under fixed randomness the target is one function: EOT draws would repeat the same gradient."""
    defense, x, y, indices = setup
    threat = ThreatModel("linf", Epsilon.parse("2/255"))
    single, repeated = PGD(threat, steps=2), PGD(threat, steps=2, eot=3)
    for name in ("non-adaptive", "adaptive", "bpda"):
        used = get_protocol(name).attack_for(repeated)
        assert used.params() == single.params() and used.label() == "PGD-2"
        assert get_protocol(name).attack_for(single) is single  # non-EOT attacks (and keys) unchanged
    assert repeated.eot == 3 and get_protocol("adaptive-eot").attack_for(repeated) is repeated

    calls = []
    hook = defense.classifier.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        runs = []
        for attack in (single, repeated):
            calls.clear()
            result = get_protocol("adaptive").run(DIFFPURE, defense, attack, x[:4], y[:4], indices[:4], 0)
            runs.append((result.x_adv, len(calls)))
    finally:
        hook.remove()
    (x_single, calls_single), (x_repeated, calls_repeated) = runs
    assert calls_single == calls_repeated and torch.equal(x_single, x_repeated)

"""Every diffusion purifier entry: randomness from its NoiseDraws only, batch invariance, gradients;
ADP's adaptive step, guidance through the UNet (DDA, MimicDiffusion), ScoreOpt's checkpointing."""

from __future__ import annotations

import pytest
import torch

from defenses.adp import ADP_ENTRY
from defenses.dda import DDA_ENTRY, low_pass
from defenses.diffpure import DIFFPURE
from defenses.mimicdiffusion import MIMICDIFFUSION
from defenses.scoreopt import SCOREOPT_N, SCOREOPT_O
from harness.attacks.catalog import build_attack
from harness.core.context import BuildContext
from harness.data import dataset_info
from harness.toolkit.diffusion import build_unet, ddpm_preset
from harness.core.errors import UsageError
from harness.core.noise import FixedNoise
from harness.evaluation.protocols import get_protocol
from harness.core.entry import defense_registry
from harness.core.threat import Epsilon, ThreatModel

ENTRIES = (DIFFPURE, DDA_ENTRY, MIMICDIFFUSION, SCOREOPT_O, SCOREOPT_N, ADP_ENTRY)
GUIDED = (DDA_ENTRY, MIMICDIFFUSION)
INFO = dataset_info("cifar10")


pytestmark = pytest.mark.usefixtures("one_thread")


def build(entry, classifier: torch.nn.Module | None = None, **options):
    state = build_unet(ddpm_preset("tiny")["unet"], INFO.image_shape, seed=1).state_dict()
    ctx = BuildContext(entry_name=entry.name, dataset=INFO, classifier=classifier or torch.nn.Flatten(),
                       preset="tiny", config=entry.preset_config("tiny"), options=options, weights=lambda: state)
    return entry.build(ctx).eval()


def images(n: int) -> torch.Tensor:
    return torch.rand((n, *INFO.image_shape), generator=torch.Generator().manual_seed(0))


def test_entries_are_registered_and_stochastic():
    names = set(defense_registry(reload=True).names())
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


CHECKPOINTED = [(e, {"guidance": g}) for e in GUIDED for g in ("x0", "unet")] + [
    (e, {}) for e in (SCOREOPT_O, SCOREOPT_N, ADP_ENTRY)]


@pytest.mark.parametrize("entry,options", CHECKPOINTED, ids=lambda v: getattr(v, "name", None) or
                         ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_checkpointed_gradient_matches_plain(entry, options):
    grads = []
    for checkpoint in (True, False):
        defense = build(entry, checkpoint=checkpoint, **options)
        x = images(2).requires_grad_(True)
        out = defense.purify(x, FixedNoise(0).draws([0, 1]))
        grads.append(torch.autograd.grad((out * images(2).flip(0)).sum(), x)[0])
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entry,options", [(DDA_ENTRY, {"guidance": "unet"}), (MIMICDIFFUSION, {"guidance": "unet"}),
                                           (SCOREOPT_N, {}), (ADP_ENTRY, {"sigma": 0.05})],
                         ids=lambda v: getattr(v, "name", None) or ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_exact_gradient_matches_finite_differences(entry, options):
    """Second-order terms (guidance or Adam through the UNet, ADP's step size) are in the gradient."""
    purifier = build(entry, **options).purifier.double()
    x = (0.3 + 0.4 * images(1)).double().requires_grad_(True)  # away from ADP's clipping
    direction, weight = (images(2).double() - 0.5).chunk(2)

    def f(v: torch.Tensor) -> torch.Tensor:
        return (purifier.purify(v * 2 - 1, FixedNoise(0).draws([0])) * weight).sum()

    exact = (torch.autograd.grad(f(x), x)[0] * direction).sum()
    h = 1e-7  # Adam's normalisation (ScoreOpt) is strongly curved: small steps, float64
    with torch.no_grad():
        numeric = (f(x + h * direction) - f(x - h * direction)) / (2 * h)
    torch.testing.assert_close(exact, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("entry,options", [(ADP_ENTRY, {}), (DDA_ENTRY, {"guidance": "unet"})],
                         ids=["adp", "dda-unet"])
def test_adaptive_protocol_attacks_through_the_purifier(entry, options):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
    defense = build(entry, classifier=classifier.requires_grad_(False), **options)
    x, indices = images(2), torch.tensor([3, 4])
    with torch.no_grad():  # the labels the defense gets right under the protocol's evaluation noise
        y = defense(x, FixedNoise(0, namespace="defense").draws(indices)).argmax(1)
    eps = 8 / 255
    attack = build_attack({"name": "pgd", "steps": 2}, ThreatModel("linf", Epsilon.parse("8/255")))
    result = get_protocol("adaptive").run(entry, defense, attack, x, y, indices, seed=0)
    moved = (result.x_adv - x).abs().flatten(1).amax(1)
    assert torch.equal(result.clean_pred, y) and (moved <= eps + 1e-6).all() and (moved > eps / 2).all()


@pytest.mark.parametrize("entry", GUIDED, ids=lambda e: e.name)
def test_guide_is_the_x0_gradient_of_guide_loss(entry):
    purifier = build(entry).purifier
    x0, ref = images(2) * 2 - 1, images(3)[1:] * 2 - 1
    x0.requires_grad_(True)
    grad = torch.autograd.grad(purifier.guide_loss(x0, 5, ref).sum(), x0)[0]
    assert purifier.guide_loss(x0, 5, ref).shape == (2,)
    torch.testing.assert_close(grad, purifier.guide(x0, 5, ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entry", GUIDED, ids=lambda e: e.name)
def test_unet_guidance_reduces_to_x0_guidance_without_the_unet_jacobian(entry):
    x, noise = images(2), FixedNoise(4)
    outputs = {}
    for guidance in ("x0", "unet"):
        purifier = build(entry, guidance=guidance).purifier
        purifier.eps = lambda xt, t: 0.3 * torch.ones_like(xt)  # a constant noise prediction
        with torch.no_grad():
            outputs[guidance] = purifier(x, noise.draws([0, 1]))
    torch.testing.assert_close(outputs["unet"], outputs["x0"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # with the real UNet, its Jacobian changes the pull
        real = {g: build(entry, guidance=g).purify(x, noise.draws([0, 1])) for g in ("x0", "unet")}
    assert not torch.allclose(real["x0"], real["unet"], atol=1e-4)


@pytest.mark.parametrize("entry", GUIDED, ids=lambda e: e.name)
def test_unet_guidance_is_batch_invariant_and_recorded(entry):
    defense = build(entry, guidance="unet")
    x, noise = images(3), FixedNoise(2)
    with torch.no_grad():
        full = defense.purify(x, noise.draws([0, 1, 2]))
        alone = defense.purify(x[2:], noise.draws([2]))
    assert torch.equal(full[2:], alone) and not full.requires_grad
    assert defense.purifier.provenance["guidance"] == "unet"
    assert build(DIFFPURE).purifier.provenance.get("guidance") is None
    with pytest.raises(UsageError, match="valid: x0, unet"):
        build(entry, guidance="xt")


def test_adp_moves_a_fixed_fraction_toward_the_mode_of_a_point_mass():
    """With the exact noise prediction of a point mass at c, ADP's direction is linear with slope
    -1/sigma_t, its line search finds step_scale * sigma_t, and each step moves the image a fraction
    step_scale of the way to c (Yoon et al. 2021, adaptive step size)."""
    steps, lam = 3, 0.05
    purifier = build(ADP_ENTRY, sigma=0.0, steps=steps, step_scale=lam).purifier
    schedule, t = purifier.schedule, purifier.t
    c = torch.full((1, *INFO.image_shape), 0.2)  # the mode, data scale [-1, 1]
    a = schedule.alpha_bar(t)
    purifier.eps = lambda xt, t_: (xt - a.sqrt() * c) / (1 - a).sqrt()
    x = 0.3 + 0.4 * images(2)  # pixels: ADP works in [0, 1]
    alpha = purifier.step_size(x, purifier.direction(x))
    torch.testing.assert_close(alpha, torch.full((2,), lam * schedule.sigma(t) / 2), rtol=1e-3, atol=0)
    with torch.no_grad():
        out = purifier(x, FixedNoise(0).draws([0, 1]))
    mode = (c + 1) / 2
    torch.testing.assert_close(out, mode + (1 - lam) ** steps * (x - mode), rtol=1e-4, atol=1e-4)
    stopped = build(ADP_ENTRY, sigma=0.0, steps=steps, step_scale=lam, stop=1.0).purifier
    stopped.eps = purifier.eps
    with torch.no_grad():  # every step size is below `stop`: nothing moves
        torch.testing.assert_close(stopped(x, FixedNoise(0).draws([0, 1])), x, rtol=0, atol=1e-6)


def test_adp_options_and_score_timestep():
    purifier = build(ADP_ENTRY, score_sigma=0.1).purifier
    schedule = purifier.schedule
    levels = [schedule.sigma(t) / 2 for t in range(schedule.num_steps)]
    assert purifier.t == min(range(len(levels)), key=lambda t: abs(levels[t] - 0.1))
    assert purifier.provenance["score_t"] == purifier.t and purifier.provenance["score_sigma"] == 0.1
    assert "sampler" not in purifier.provenance
    assert build(ADP_ENTRY).purifier.provenance["sigma"] == 0.25
    with pytest.raises(UsageError, match="valid: sigma, steps, step_scale"):
        ADP_ENTRY.check_options({"sampler": "ddim"})
    with pytest.raises(UsageError, match="score_sigma > 0"):
        build(ADP_ENTRY, score_sigma=0)


def test_low_pass_is_a_projection():
    x = images(2)
    once = low_pass(x, 4)
    torch.testing.assert_close(low_pass(once, 4), once)
    assert once.shape == x.shape

"""Attacks against known answers, on a small classifier trained on the real CIFAR-10 JPEG copy.

An attack weaker than it claims makes every leaderboard row a lie, so: an undefended model falls to
~0 at 8/255; robust never exceeds clean; more steps never help the defender; a large epsilon breaks
everything; a fixed seed reproduces; every adversarial image stays within eps and [0, 1]; and PGD-20
is at least as strong as AutoAttack's APGD-CE.
"""

from __future__ import annotations

import pytest
import torch

from harness.core.artifacts import ArtifactCache
from harness.attacks.base import perturbation_norm
from harness.attacks.catalog import build_attack
from harness.attacks.pgd import PGD
from harness.classifiers.sources import resolve_classifier
from harness.data import load_split
from harness.evaluation.protocols import get_protocol
from harness.core.entry import Defense, defense_registry
from harness.evaluation.runner import evaluation_subset
from harness.core.threat import Epsilon, ThreatModel

N = 256
LINF = ThreatModel("linf", Epsilon.parse("8/255"))


@pytest.fixture(scope="module")
def setup(real_data_root, tmp_path_factory):
    """The `tiny` preset classifier trained here (seconds), the first N test images."""
    test = load_split("cifar10", "test", real_data_root)
    artifacts = ArtifactCache(tmp_path_factory.mktemp("artifacts"))
    loaded = resolve_classifier("trained:tiny", test.info, artifacts=artifacts, data_root=str(real_data_root),
                                progress=False)
    indices = evaluation_subset(len(test.labels), N)
    return Defense(loaded.model), test.float_images(indices), test.labels[indices], indices


def _robust_mask(setup, attack, protocol="adaptive", seed=0):
    defense, x, y, indices = setup
    entry = defense_registry().get("none")
    result = get_protocol(protocol).run(entry, defense, attack, x, y, indices, seed)
    return result, (result.clean_pred == y), (result.clean_pred == y) & (result.adv_pred == y)


def test_classifier_learned_something(setup):
    _, clean_ok, _ = _robust_mask(setup, PGD(LINF, steps=0))
    assert clean_ok.float().mean() > 0.35  # chance is 0.10; the `tiny` preset reaches ~0.5


@pytest.mark.parametrize("norm,eps", [("linf", "8/255"), ("l2", "0.5")])
def test_adversarials_within_eps_and_unit_box(setup, norm, eps):
    threat = ThreatModel(norm, Epsilon.parse(eps))
    result, _, _ = _robust_mask(setup, PGD(threat, steps=5))
    _, x, _, _ = setup
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert perturbation_norm(result.x_adv, x, norm).max() <= threat.eps.value * (1 + 1e-5)


def test_undefended_falls_to_zero_at_8_255(setup):
    _, clean_ok, robust = _robust_mask(setup, PGD(LINF, steps=20))
    assert robust.float().mean() <= 0.02
    assert bool((robust <= clean_ok).all())


def test_more_steps_never_help_the_defender(setup):
    robust_sets = [_robust_mask(setup, PGD(LINF, steps=s, step_size=0.5 / 255))[2] for s in (2, 5, 10)]
    for fewer, more in zip(robust_sets, robust_sets[1:]):
        assert bool((more <= fewer).all()), "a sample robust to more steps fell to fewer"
    assert robust_sets[-1].sum() < robust_sets[0].sum()


def test_large_epsilon_breaks_everything(setup):
    _, _, robust = _robust_mask(setup, PGD(ThreatModel("linf", Epsilon.parse("0.5")), steps=10))
    assert robust.sum() == 0


def test_zero_epsilon_changes_nothing(setup):
    result, clean_ok, robust = _robust_mask(setup, PGD(ThreatModel("linf", Epsilon.parse("0")), steps=3))
    assert torch.equal(robust, clean_ok)


def test_fixed_seed_reproduces_and_other_seed_differs(setup):
    attack = PGD(LINF, steps=3, step_size=0.5 / 255)
    a, _, _ = _robust_mask(setup, attack, seed=1)
    b, _, _ = _robust_mask(setup, attack, seed=1)
    c, _, _ = _robust_mask(setup, attack, seed=2)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.adv_pred, b.adv_pred)
    assert not torch.equal(a.x_adv, c.x_adv)


def test_pgd20_at_least_as_strong_as_apgd_ce(setup):
    _, _, pgd_robust = _robust_mask(setup, PGD(LINF, steps=20))
    apgd, _, apgd_robust = _robust_mask(setup, build_attack({"name": "apgd-ce"}, LINF))
    _, x, _, _ = setup
    assert perturbation_norm(apgd.x_adv, x, "linf").max() <= LINF.eps.value + 1e-6
    assert pgd_robust.float().mean() <= apgd_robust.float().mean() + 0.01

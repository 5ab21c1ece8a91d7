"""Epsilon parsing and attack specs: bad input gets an error naming the valid choices."""

import pytest

from harness.attacks.catalog import build_attack, parse_attack_spec
from harness.core.errors import UsageError
from harness.core.threat import Epsilon, ThreatModel


def test_epsilon_as_fraction_or_float():
    e = Epsilon.parse("8/255")
    assert e.value == pytest.approx(8 / 255) and e.text == "8/255"
    assert Epsilon.parse("0.0314").value == pytest.approx(0.0314)


@pytest.mark.parametrize("bad", ["eight", "1/0", "-0.1", "inf", ""])
def test_bad_epsilon_is_a_clear_error(bad):
    with pytest.raises(UsageError, match="epsilon"):
        Epsilon.parse(bad)


def test_unknown_threat_lists_valid():
    with pytest.raises(UsageError, match="linf, l2"):
        ThreatModel("l1", Epsilon.parse("1"))


def test_attack_specs():
    spec = parse_attack_spec("pgd:steps=50,eot=4,step_size=0.01")
    assert spec == {"name": "pgd", "steps": 50, "eot": 4, "step_size": 0.01}
    attack = build_attack(spec, ThreatModel("linf", Epsilon.parse("8/255")))
    assert attack.label() == "PGD-50xEOT4"
    assert parse_attack_spec("autoattack:version=rand")["version"] == "rand"
    with pytest.raises(UsageError, match="apgd-ce, apgd-dlr, apgd-t, autoattack, fab-t, pgd, square"):
        parse_attack_spec("fgsm")
    with pytest.raises(UsageError, match="bad options"):
        build_attack({"name": "pgd", "stepz": 3}, ThreatModel("linf", Epsilon.parse("8/255")))


def test_pgd_defaults_keep_their_params_and_new_options_are_recorded():
    from harness.core.threat import Epsilon, ThreatModel

    threat = ThreatModel("linf", Epsilon.parse("8/255"))
    assert set(build_attack({"name": "pgd"}, threat).params()) == {"name", "norm", "steps", "step_size",
                                                                    "random_start", "eot"}
    margin = build_attack({"name": "pgd", "loss": "margin", "restarts": 3}, threat)
    assert margin.params()["loss"] == "margin" and margin.params()["restarts"] == 3
    assert margin.label() == "PGD-20-marginx3R"
    with pytest.raises(UsageError, match="unknown loss 'cw'"):
        build_attack({"name": "pgd", "loss": "cw"}, threat)


def test_restarts_and_the_margin_loss_never_help_the_defender():
    import torch
    from torch import nn

    from harness.attacks.base import Target
    from harness.core.threat import Epsilon, ThreatModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x = torch.rand(64, 3, 8, 8)
    y = model(x).argmax(1)
    target, indices = Target(lambda images, _: model(images)), torch.arange(64)
    threat = ThreatModel("linf", Epsilon.parse("1/255"))

    def standing(**options):
        x_adv = build_attack({"name": "pgd", "steps": 5, **options}, threat).perturb(target, x, y, indices, 0)
        return model(x_adv).argmax(1) == y

    once, thrice = standing(), standing(restarts=3)
    assert bool((thrice <= once).all())  # a restart only attacks points still standing
    assert 0 < int(once.sum()) < 64

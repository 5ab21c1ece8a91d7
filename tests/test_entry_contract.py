"""The defense-entry contract: typed presets, declared options, reported tiers, kinds, and the generic
registry's suggestions and lazy, isolated plugin loading."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from harness.api import Defense, DefenseEntry, Kind, Option, Reported, Registry, Role, UsageError


def _entry(**kw) -> DefenseEntry:
    base = dict(name="x", version="1", kind=Kind.PURIFIER, paper="p", citation="c",
                build=lambda ctx: Defense(ctx.classifier))
    return DefenseEntry(**{**base, **kw})


def test_a_typo_in_one_preset_fails_at_registration():
    good = {"small": {"epochs": 1, "train": {"lr": 0.1}}, "paper": {"epochs": 200, "train": {"lr": 0.05}}}
    assert _entry(presets=good, train=lambda ctx: {}).preset_config("paper")["epochs"] == 200
    with pytest.raises(ValueError, match="unknown: epoch"):
        _entry(presets={"small": {"epochs": 1}, "paper": {"epoch": 2}}, train=lambda ctx: {})
    with pytest.raises(ValueError, match="at 'train'.*unknown: lrr"):
        _entry(presets={"small": {"train": {"lr": 0.1}}, "paper": {"train": {"lrr": 0.1}}}, train=lambda ctx: {})
    with pytest.raises(ValueError, match="'epochs' is a str"):
        _entry(presets={"small": {"epochs": 1}, "paper": {"epochs": "200"}}, train=lambda ctx: {})


def test_dataclass_presets_are_their_fields():
    @dataclass(frozen=True)
    class Recipe:
        epochs: int
        lr: float

    entry = _entry(presets={"small": Recipe(1, 0.1), "paper": Recipe(200, 0.05)}, train=lambda ctx: {})
    assert entry.preset_config(None) == {"epochs": 1, "lr": 0.1}
    with pytest.raises(UsageError, match="did you mean 'paper'"):
        entry.preset_config("papr")


def test_options_are_declared_typed_and_suggested():
    entry = _entry(options=(Option("steps", int, "steps"), Option("mode", str, "mode", choices=("a", "b"))))
    assert entry.check_options({"steps": 3, "mode": "a"}) == {"steps": 3, "mode": "a"}
    with pytest.raises(UsageError, match="no option 'step' \\(did you mean 'steps'\\?\\); valid: steps, mode"):
        entry.check_options({"step": 3})
    with pytest.raises(UsageError, match="must be a int"):
        entry.check_options({"steps": "many"})
    with pytest.raises(UsageError, match="must be one of a, b"):
        entry.check_options({"mode": "c"})
    assert entry.select_options({"steps": 3, "other": 1}) == {"steps": 3}
    with pytest.raises(ValueError, match="twice"):
        _entry(options=(Option("steps", int, "a"), Option("steps", int, "b")))


def test_reported_numbers_name_their_tier_and_unit():
    with pytest.raises(ValueError, match="protocol tier"):
        Reported("cifar10", "linf", "8/255", "AA", 90.0, 50.0, "paper")
    reported = Reported("cifar10", "linf", "8/255", "AA", 90.0, 50.0, "paper", tier="adaptive")
    assert reported.describe()["unit"] == "percent"


def test_kinds_say_whether_the_base_classifier_is_used():
    assert _entry().uses_base_classifier
    assert _entry(kind=Kind.UNDEFENDED, role=Role.BASELINE).uses_base_classifier
    assert not _entry(kind=Kind.CLASSIFIER).uses_base_classifier
    assert _entry(kind=Kind.UNDEFENDED, role=Role.BASELINE).describe()["role"] == "baseline"


def test_registry_rejects_duplicates_and_suggests_the_closest_name():
    registry: Registry[int] = Registry("widget", expects=int)
    registry.add("alpha", 1)
    with pytest.raises(ValueError, match="twice"):
        registry.add("alpha", 2)
    with pytest.raises(TypeError, match="must be a int"):
        registry.add("beta", "two")
    with pytest.raises(UsageError, match="unknown widget 'alpa' \\(did you mean 'alpha'\\?\\); valid: alpha"):
        registry.get("alpa")


def test_listing_imports_neither_diffusers_nor_autoattack():
    code = ("import sys; from click.testing import CliRunner; from harness.cli import main; "
            "r = CliRunner().invoke(main, ['list']); assert r.exit_code == 0, r.output; "
            "assert 'diffpure' in r.output; "
            "print(sorted(m for m in ('diffusers', 'pyautoattack') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""The registry contract, and a third-party plugin found through the entry-point group."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.core.errors import UsageError
from harness.core.entry import Defense, DefenseEntry, Kind, defense_registry, registry_of

HERE = Path(__file__).parent


def _entry(name="x", **kw):
    return DefenseEntry(name=name, version="1", kind=Kind.PURIFIER, paper="p", citation="c",
                        build=lambda ctx: Defense(ctx.classifier), **kw)


def test_first_party_entries_are_discovered_through_entry_points():
    names = defense_registry(reload=True).names()
    assert {"none", "maep"} <= set(names)


def test_unknown_defense_lists_valid_names():
    with pytest.raises(UsageError) as info:
        defense_registry().get("diffpurr")
    assert "none" in str(info.value) and "maep" in str(info.value)


def test_duplicates_rejected_and_names_checked():
    registry = registry_of(_entry("a"))
    with pytest.raises(ValueError, match="twice"):
        registry.add("a", _entry("a"))
    with pytest.raises(ValueError, match="alphanumeric"):
        _entry("bad name!")
    with pytest.raises(ValueError, match="no presets"):
        _entry("t", train=lambda ctx: {})


def test_preset_errors_list_valid_presets():
    entry = _entry("p", presets={"small": {"a": 1}, "paper": {"a": 2}}, train=lambda ctx: {})
    assert entry.default_preset == "small"
    assert entry.preset_config("paper") == {"a": 2}
    with pytest.raises(UsageError, match="small, paper"):
        entry.preset_config("huge")


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The demo plugin installed (pip, no deps) into a throwaway site folder."""
    site = tmp_path_factory.mktemp("site")
    source = shutil.copytree(HERE / "plugin_pkg", tmp_path_factory.mktemp("src") / "plugin_pkg")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True)
    return site


def _harness(args, site, env_extra):
    env = dict(os.environ, PYTHONPATH=str(site), **env_extra)
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_plugin_is_listed_and_runs(plugin_site, tiny_cifar, harness_home, tmp_path):
    from harness.classifiers.sources import save_classifier
    from harness.classifiers.architectures import build_classifier

    env = {"HARNESS_HOME": str(harness_home)}
    listed = _harness(["list"], plugin_site, env)
    assert listed.returncode == 0, listed.stderr
    assert "demo-blur" in listed.stdout and "maep" in listed.stdout

    clf = save_classifier(build_classifier("convnet-tiny", 10), "convnet-tiny", 10, tmp_path / "clf.safetensors")
    db = tmp_path / "r.db"
    result = _harness(["run", "--defense", "demo-blur", "--classifier", str(clf), "--n", "6",
                       "--attack", "pgd:steps=2", "--db", str(db), "--no-progress"], plugin_site, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("demo-blur") == 2  # one cell per protocol

    bad = _harness(["run", "--defense", "demo-blurr", "--db", str(db)], plugin_site, env)
    assert bad.returncode != 0
    assert "unknown defense 'demo-blurr'" in bad.stderr and "demo-blur" in bad.stderr

"""The RobustBench classifier entries (defenses/robustbench_zoo.py, after Croce et al., NeurIPS 2021 D&B):
registered, listed without importing robustbench or torchvision, carrying RobustBench's numbers with a
tier and a source, loading through harness's robustbench loader, and a one-line install hint without it.
The real robustbench path (torch 2.14.1, a checkpoint on disk) is checked by scripts/ci-robustbench.sh."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.api import ArtifactCache, Kind, Role, UsageError, dataset_info, defense_registry
from harness.evaluation.building import build_defense, own_network
from harness.report.frame import match_reported

from defenses import robustbench_zoo
from defenses.robustbench_zoo import ROBUSTBENCH_MODELS

NAMES = tuple(ROBUSTBENCH_MODELS)


def test_the_entries_are_registered_as_classifiers_harness_does_not_train():
    registry = defense_registry()
    assert set(NAMES) <= set(registry.names())
    assert {"rb-standard", "rb-wang2023-wrn-28-10", "rb-wang2023-wrn-70-16"} <= set(NAMES)
    for name in NAMES:
        entry = registry.get(name)
        assert entry.kind is Kind.CLASSIFIER and entry.train is None and not entry.presets
        assert not entry.stochastic and entry.metadata.parameters and entry.metadata.architecture
        assert ROBUSTBENCH_MODELS[name] in entry.description
    assert registry.get("rb-standard").role is Role.BASELINE
    assert registry.get("rb-wang2023-wrn-28-10").role is Role.DEFENSE
    assert registry.get("rb-wang2023-wrn-70-16").metadata.architecture == "WRN-70-16"


def test_listing_them_imports_neither_robustbench_nor_torchvision():
    code = ("import sys; from click.testing import CliRunner; from harness.cli import main; "
            "r = CliRunner().invoke(main, ['list']); assert r.exit_code == 0, r.output; "
            "assert 'rb-wang2023-wrn-28-10' in r.output and 'rb-standard' in r.output, r.output; "
            "r = CliRunner().invoke(main, ['list', '--defense', 'rb-wang2023-wrn-70-16']); "
            "assert r.exit_code == 0 and '70.69' in r.output, r.output; "
            "print(sorted(m for m in ('robustbench', 'torchvision', 'pyautoattack') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# RobustBench's model_info/<dataset>/Linf/<model>.json: clean_acc, autoattack_acc
LEADERBOARD = {
    ("rb-standard", "cifar10"): (94.78, 0.0),
    ("rb-wang2023-wrn-28-10", "cifar10"): (92.44, 67.31),
    ("rb-wang2023-wrn-28-10", "cifar100"): (72.58, 38.83),
    ("rb-wang2023-wrn-70-16", "cifar10"): (93.25, 70.69),
    ("rb-wang2023-wrn-70-16", "cifar100"): (75.22, 42.67),
    ("rb-rebuffi2021-wrn-28-10", "cifar10"): (87.33, 60.75),
    ("rb-rebuffi2021-wrn-28-10", "cifar100"): (62.41, 32.06),
}


def test_reported_numbers_carry_the_adaptive_tier_and_their_leaderboard_file():
    registry = defense_registry()
    seen = {}
    for name in NAMES:
        entry = registry.get(name)
        assert entry.reported, name
        for item in entry.reported:
            assert item.tier == "adaptive" and item.threat == "linf" and item.eps == "8/255"
            assert item.attack == "AutoAttack standard" and item.dataset in entry.datasets
            assert "RobustBench" in item.source
            assert f"model_info/{item.dataset}/Linf/{ROBUSTBENCH_MODELS[name]}.json" in item.source
            assert 0 <= item.robust <= item.clean <= 100
            seen[(name, item.dataset)] = (item.clean, item.robust)
    assert seen == LEADERBOARD


def test_the_reported_columns_pick_them_for_adaptive_cells_only():
    described = [r.describe() for r in robustbench_zoo.RB_WANG2023_WRN_28_10.reported]
    cell = dict(dataset="cifar10", threat="linf", eps=8 / 255, eps_text="8/255", attack_label="AutoAttack standard")
    hit = match_reported(described, protocol="adaptive", **cell)
    assert hit is not None and (hit["clean"], hit["robust"]) == (92.44, 67.31)
    assert match_reported(described, protocol="non-adaptive", **cell) is None
    assert match_reported(described, protocol="adaptive", **{**cell, "dataset": "cifar100"})["robust"] == 38.83


def _without_robustbench(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if robustbench were not installed (an import of it raises ImportError)."""
    monkeypatch.setitem(sys.modules, "robustbench", None)
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)


def test_building_without_robustbench_is_the_one_line_install_hint(monkeypatch, tmp_path):
    _without_robustbench(monkeypatch)
    with pytest.raises(UsageError) as caught:
        build_defense(robustbench_zoo.RB_STANDARD, None, None, dataset_info("cifar10"), ArtifactCache(tmp_path))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("robustbench is not installed") and "pip install 'harness[robustbench]'" in message
    assert not (tmp_path / "robustbench").exists()


def test_a_dataset_robustbench_has_no_checkpoint_for_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot be evaluated on 'cifar100'; valid: cifar10$"):
        build_defense(robustbench_zoo.RB_STANDARD, None, None, dataset_info("cifar100"), ArtifactCache(tmp_path))


class _Fake(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.head = nn.Linear(3 * 32 * 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


def test_the_build_loads_the_named_model_from_the_artifact_roots_robustbench_folder(monkeypatch, tmp_path):
    calls = []

    def load_model(model_name: str, model_dir: str, dataset: str, threat_model: str) -> nn.Module:
        calls.append((model_name, Path(model_dir), dataset, threat_model))
        torch.manual_seed(0)
        return _Fake(dataset_info(dataset).num_classes)

    utils = types.ModuleType("robustbench.utils")
    utils.load_model = load_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "robustbench", types.ModuleType("robustbench"))
    monkeypatch.setitem(sys.modules, "robustbench.utils", utils)
    artifacts = ArtifactCache(tmp_path)
    entry = robustbench_zoo.RB_WANG2023_WRN_28_10
    network = own_network(entry, None, dataset_info("cifar100"), artifacts)
    assert calls == [("Wang2023Better_WRN-28-10", tmp_path / "robustbench", "cifar100", "Linf")]
    assert network.id.startswith("rb-wang2023-wrn-28-10@") and network.defense is not None
    assert isinstance(network.defense.classifier, _Fake) and not network.defense.has_purifier
    assert not network.defense.classifier.training
    assert all(not p.requires_grad for p in network.defense.parameters())
    assert network.defense(torch.zeros(2, 3, 32, 32), None).shape == (2, 100)
    again = own_network(entry, None, dataset_info("cifar100"), artifacts)
    assert again.id == network.id  # the same weights name the same network

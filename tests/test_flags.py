"""Evaluation-quality flags fire on deliberately broken defenses and stay quiet on the undefended one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.api import Defense, DefenseEntry, Kind, Purifier
from harness.core.entry import defense_registry, registry_of
from harness.evaluation.runner import RunRequest, run_grid
from harness.report.writer import cell_flag_map
from harness.results import open_db


class Quantise(Purifier):
    """Gradient masking: rounding to 4 grey levels has a zero gradient almost everywhere."""

    def forward(self, x, noise):
        return torch.round(x * 3) / 3


class Softmax(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


class Jitter(nn.Module):
    """A randomised classifier that does not take its randomness from the noise it is handed."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.05 * torch.randn_like(x))


class Optimising(Purifier):
    """A dynamic defense: a gradient step on a smoothness loss inside the forward pass."""

    def forward(self, x, noise):
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            loss = (z[..., 1:] - z[..., :-1]).abs().sum()
            grad, = torch.autograd.grad(loss, z)
        return (x - 0.01 * grad.sign()).clamp(0, 1)


def _classifier_entry(name: str, wrap) -> DefenseEntry:
    def build(ctx):
        torch.manual_seed(0)
        return Defense(wrap(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))))
    return DefenseEntry(name=name, version="1", kind=Kind.CLASSIFIER, paper="p", citation="c", build=build)


ENTRIES = [
    DefenseEntry(name="quantise", version="1", kind=Kind.PURIFIER, paper="p", citation="c",
                 build=lambda ctx: Defense(ctx.classifier, Quantise())),
    DefenseEntry(name="optimising", version="1", kind=Kind.PURIFIER, paper="p", citation="c",
                 build=lambda ctx: Defense(ctx.classifier, Optimising())),
    _classifier_entry("softmax", Softmax),
    _classifier_entry("jitter", Jitter),
]


@pytest.fixture()
def flags(tiny_cifar, tmp_path, classifier_file):
    engine = open_db(str(tmp_path / "r.db"))
    registry = registry_of(*ENTRIES, defense_registry().get("none"))
    request = RunRequest(defenses=("none", "quantise", "optimising", "softmax", "jitter"), classifier=classifier_file,
                         n=16, batch_size=16, attacks=({"name": "pgd", "steps": 8},),
                         protocols=("non-adaptive", "adaptive"), progress=False)
    outcomes = run_grid(request, engine, registry)
    by_cell = cell_flag_map(engine)
    return {(o.defense, o.protocol): {f["name"] for f in by_cell[o.key]} for o in outcomes}


def test_flags_fire_on_broken_defenses_and_not_on_none(flags):
    assert flags[("none", "adaptive")] == set()
    assert "vanishing-gradients" in flags[("quantise", "adaptive")]
    assert "vanishing-gradients" not in flags[("quantise", "non-adaptive")]
    assert "probabilities" in flags[("softmax", "adaptive")]
    assert "randomness" in flags[("jitter", "adaptive")]
    assert "dynamic" in flags[("optimising", "adaptive")]

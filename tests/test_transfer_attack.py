"""The transfer attack (Papernot et al. 2017; Tramèr et al. 2018): PGD on a source model, replayed.

From a model to itself it is white-box PGD, exactly; from an independent model it is weaker; every source
has cells of its own; a bad source is a one-line error naming the valid ones; and it feeds the
black-box-beats-white-box flag: it fires on a gradient-masking purifier under the adaptive protocol and
stays quiet on the undefended classifier. Tiny synthetic data and a classifier trained here in seconds.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import nn

from harness.api import Defense, DefenseEntry, Kind, Purifier
from harness.attacks.base import Target
from harness.attacks.catalog import build_attack, parse_attack_spec
from harness.attacks.pgd import PGD
from harness.attacks.transfer import SourceModel, TransferAttack
from harness.cli import main
from harness.core.entry import defense_registry, registry_of
from harness.core.errors import UsageError
from harness.core.threat import Epsilon, ThreatModel
from harness.evaluation.runner import RunRequest, run_grid
from harness.report.writer import cell_flag_map
from harness.results import open_db
from harness.results.queries import done_samples
from harness.results.schema import Cell

EPS = "16/255"
STEPS = 8
FLAG = "black-box-beats-white-box"


# --- the attack on its own -------------------------------------------------------------------------------

def _linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()


def _source(model: nn.Module, name: str = "m") -> SourceModel:
    return SourceModel({"entry": name, "version": "1", "network": f"{name}@0"},
                       lambda seed: Target(lambda x, indices: model(x)))


@pytest.mark.parametrize("options", [{}, {"loss": "margin"}, {"restarts": 3, "random_start": True}])
def test_transfer_from_the_model_itself_is_white_box_pgd(options):
    model = _linear(0)
    x = torch.rand(32, 3, 8, 8)
    y = model(x).argmax(1)
    indices = torch.arange(32)
    threat = ThreatModel("linf", Epsilon.parse("1/255"))
    white = PGD(threat, steps=5, **options).perturb(Target(lambda images, _: model(images)), x, y, indices, 0)
    transfer = TransferAttack(threat, steps=5, **options).with_source(_source(model))
    # the target it is handed is never called: the examples come from the source alone
    never = Target(lambda images, _: (_ for _ in ()).throw(AssertionError("the target was queried")))
    replayed = transfer.perturb(never, x, y, indices, 0)
    assert torch.equal(replayed, white)
    assert 0 < int((model(white).argmax(1) != y).sum()) < 32  # the comparison is not vacuous


def test_params_name_the_source_so_keys_differ_per_source():
    threat = ThreatModel("linf", Epsilon.parse("8/255"))
    attack = build_attack(parse_attack_spec("transfer:steps=10"), threat)
    assert isinstance(attack, TransferAttack) and attack.source == "none"
    a, b = attack.with_source(_source(_linear(0), "a")), attack.with_source(_source(_linear(1), "b"))
    assert a.params()["source"] == {"entry": "a", "version": "1", "network": "a@0"}
    assert a.params() != b.params()
    assert {k: v for k, v in a.params().items() if k != "source"} == \
        {"name": "transfer", "norm": "linf", "craft": "pgd", "steps": 10, "step_size": threat.eps.value / 4,
         "random_start": True, "loss": "ce", "restarts": 1}
    assert a.label() == "Transfer(none)-PGD-10"


def test_an_unbound_transfer_attack_says_what_it_needs():
    attack = TransferAttack(ThreatModel("linf", Epsilon.parse("8/255")))
    with pytest.raises(UsageError, match="needs its source model 'none'") as error:
        attack.params()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("spec,message", [
    ("transfer:steps=-1", "bad options for attack 'transfer': steps must be a whole number >= 0, got -1"),
    ("transfer:loss=cw", "bad options for attack 'transfer': unknown loss 'cw'; valid: ce, margin"),
    ("transfer:source=a b", "bad options for attack 'transfer': source must name a defense entry"),
    ("transfer:eot=4", "bad options for attack 'transfer': no option 'eot'; valid: source, steps"),
])
def test_bad_transfer_options_are_one_line(spec, message):
    with pytest.raises(UsageError) as error:
        build_attack(parse_attack_spec(spec), ThreatModel("linf", Epsilon.parse("8/255")))
    assert message in str(error.value) and "\n" not in str(error.value)


# --- through the runner ----------------------------------------------------------------------------------

@pytest.fixture()
def trained_file(tiny_cifar, tmp_path, one_thread) -> str:
    """A ``convnet-tiny`` fitted to the tiny synthetic training split (~95% clean test accuracy)."""
    from harness.classifiers.architectures import build_classifier
    from harness.classifiers.sources import save_classifier
    from harness.data import load_split

    train = load_split("cifar10", "train")
    x, y = train.float_images(torch.arange(len(train.labels))), train.labels
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_classifier("convnet-tiny", 10)
        optimiser = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(20):
            optimiser.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimiser.step()
    return str(save_classifier(model.eval(), "convnet-tiny", 10, tmp_path / "trained.safetensors"))


class Masking(Purifier):
    """Gradient masking at its plainest: the identity forward, a zero gradient backward."""

    def forward(self, x, noise):
        return x.detach() + 0 * x


def _independent(ctx) -> Defense:
    """An independently initialised network of the same architecture (never trained)."""
    from harness.classifiers.architectures import build_classifier

    with torch.random.fork_rng():
        torch.manual_seed(5)
        return Defense(build_classifier("convnet-tiny", 10))


MASKING = DefenseEntry(name="masking", version="1", kind=Kind.PURIFIER, paper="p", citation="c",
                       build=lambda ctx: Defense(ctx.classifier, Masking()))
INDEPENDENT = DefenseEntry(name="independent", version="1", kind=Kind.CLASSIFIER, paper="p", citation="c",
                           build=_independent)


def _run(db: Path, classifier: str, defenses: tuple[str, ...], attacks: tuple[dict, ...],
         protocols: tuple[str, ...]):
    engine = open_db(str(db))
    registry = registry_of(MASKING, INDEPENDENT, defense_registry().get("none"))
    request = RunRequest(defenses=defenses, classifier=classifier, eps=(EPS,), n=32, batch_size=32,
                         attacks=attacks, protocols=protocols, progress=False)
    outcomes = run_grid(request, engine, registry)
    assert all(o.status == "done" for o in outcomes), [(o.defense, o.attack, o.error) for o in outcomes]
    return engine, outcomes


def _samples(engine, key: str) -> dict[int, int]:
    """Sample index -> adversarial prediction of the cell ``key``."""
    return {index: adv for cell, index, _, _, adv, _ in done_samples(engine) if cell == key}


def _config(engine, key: str) -> dict:
    with Session(engine) as session:
        return session.scalars(select(Cell).where(Cell.key == key)).one().config


PGD_SPEC = {"name": "pgd", "steps": STEPS}
FROM_NONE = {"name": "transfer", "steps": STEPS}  # source=none, the default
FROM_INDEPENDENT = {"name": "transfer", "source": "independent", "steps": STEPS}


def test_sources_get_cells_of_their_own_and_an_independent_one_is_weaker(trained_file, tmp_path):
    engine, outcomes = _run(tmp_path / "r.db", trained_file, ("none",), (PGD_SPEC, FROM_NONE, FROM_INDEPENDENT),
                            ("adaptive",))
    pgd, self_transfer, independent = outcomes
    assert len({pgd.key, self_transfer.key, independent.key}) == 3
    assert self_transfer.attack == "Transfer(none)-PGD-8" and independent.attack == "Transfer(independent)-PGD-8"
    # the source is named as the runner names networks: the base classifier's id, or the entry's own network
    config = _config(engine, self_transfer.key)
    assert config["attack"]["source"] == {"entry": "none", "version": defense_registry().get("none").version,
                                          "preset": None, "options": {}, "network": config["classifier"]}
    assert "replayed" in config["attack_note"] and config["protocol"] == "adaptive"
    other = _config(engine, independent.key)["attack"]["source"]
    assert other["entry"] == "independent" and other["network"].startswith("independent@")
    # from the model to itself: white-box PGD, sample for sample
    assert _samples(engine, self_transfer.key) == _samples(engine, pgd.key)
    assert self_transfer.robust_acc == pgd.robust_acc < pgd.clean_acc
    # from an independent (random) network: much weaker than white-box
    assert independent.robust_acc > pgd.robust_acc + 0.2
    assert pgd.clean_acc > 0.8  # the classifier learned the synthetic classes


def test_black_box_beats_white_box_fires_on_gradient_masking_and_not_on_none(trained_file, tmp_path):
    engine, outcomes = _run(tmp_path / "r.db", trained_file, ("none", "masking"), (PGD_SPEC, FROM_NONE),
                            ("non-adaptive", "adaptive"))
    flags = cell_flag_map(engine)
    by = {(o.defense, o.protocol, o.attack.split("-")[0]): o for o in outcomes}
    names = {k: {f["name"] for f in flags[o.key]} for k, o in by.items()}
    fired = next(f for f in flags[by["masking", "adaptive", "Transfer(none)"].key] if f["name"] == FLAG)
    assert fired["detail"].startswith("Transfer(none)-PGD-8 alone broke")
    # the masked gradient stops white-box PGD; the examples crafted on the bare classifier go through
    assert by["masking", "adaptive", "PGD"].robust_acc > by["masking", "adaptive", "Transfer(none)"].robust_acc + 0.2
    # the undefended classifier, and the masking purifier where PGD already attacks the bare classifier: quiet
    for key in [("none", "adaptive", "PGD"), ("none", "adaptive", "Transfer(none)"),
                ("masking", "non-adaptive", "PGD"), ("masking", "non-adaptive", "Transfer(none)"),
                ("masking", "adaptive", "PGD")]:
        assert FLAG not in names[key], (key, names[key])


# --- bad input through the command line --------------------------------------------------------------------

def _rows(db: Path) -> dict[str, list[tuple]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in ("runs", "cells", "samples")}


def _harness_run(db: Path, classifier: str, attack: str):
    return CliRunner().invoke(main, ["run", "--no-progress", "--defense", "none", "--classifier", classifier,
                                     "--n", "4", "--attack", attack, "--protocol", "adaptive", "--db", str(db)])


@pytest.mark.parametrize("source,message", [
    ("nonee", "unknown transfer source 'nonee' (did you mean 'none'?); valid: "),
    ("maep", "transfer source 'maep' is a purifier: a source crafts on a classifier; valid: "),
])
def test_a_bad_source_is_one_line_naming_the_valid_ones_and_stores_nothing(tiny_cifar, classifier_file, tmp_path,
                                                                           source, message):
    db = tmp_path / "r.db"
    assert _harness_run(db, classifier_file, "pgd:steps=1").exit_code == 0
    before = _rows(db)
    result = _harness_run(db, classifier_file, f"transfer:source={source},steps=1")
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "none" in errors[0].split("valid: ")[1].split(", ")
    assert _rows(db) == before

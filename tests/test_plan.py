"""``harness plan``: the cells a run would compute, keyed exactly as the runner keys them, with their
stored status, artifacts and cost, planned without building, loading or training any model."""

from __future__ import annotations

import json

import pytest
import torch.nn.functional as F
from click.testing import CliRunner

from harness.cli import main
from harness.core.entry import Defense, DefenseEntry, Kind, Metadata, Purifier, defense_registry, registry_of
from harness.evaluation.planning import attack_passes, plan_request
from harness.evaluation.runner import RunRequest, run_grid
from harness.results import open_db


class _Blur(Purifier):
    def forward(self, x, noise):
        return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _registry():
    blur = DefenseEntry(name="blur", version="1", kind=Kind.PURIFIER, paper="p", citation="c",
                        build=lambda ctx: Defense(ctx.classifier, _Blur()), metadata=Metadata(nfe=3))
    return registry_of(defense_registry().get("none"), blur)


def _request(classifier, **kw):
    base = dict(defenses=("none", "blur"), classifier=classifier, n=8, batch_size=8, eps=("4/255", "8/255"),
                attacks=({"name": "pgd", "steps": 2},), variants=("clean", "corrupt:contrast:3"), progress=False)
    base.update(kw)
    return RunRequest(**base)


@pytest.fixture()
def no_models(monkeypatch):
    """Make building, loading or training any model fail loudly (a plan must do none of them)."""
    import harness.classifiers.sources as sources
    import harness.evaluation.building as building
    import harness.evaluation.runner as runner

    def refuse(*args, **kwargs):
        raise AssertionError("a plan built, loaded or trained a model")

    for module, names in ((sources, ("resolve_classifier", "build_classifier", "train_classifier", "_trained_model")),
                          (building, ("build_defense", "train_defense_weights")),
                          (runner, ("build_defense", "resolve_classifier", "build_transferred_defense"))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)


def test_plan_keys_are_the_stored_keys_and_done_flips(tiny_cifar, tmp_path, classifier_file, monkeypatch):
    db = str(tmp_path / "r.db")
    request, registry = _request(classifier_file), _registry()
    with monkeypatch.context() as patch:  # planning builds nothing, and creates no store
        patch.setattr("harness.evaluation.building.build_defense", _refuse)
        patch.setattr("harness.classifiers.sources.build_classifier", _refuse)
        before = plan_request(request, registry, db=db)
    assert not (tmp_path / "r.db").exists()
    # `none` answers both protocols with one adaptive cell; blur has one cell per protocol
    assert len(before.cells) == 2 * 2 * (1 + 2) and {c.status for c in before.cells} == {"missing"}
    outcomes = run_grid(request, open_db(db), registry)
    assert sorted(c.key for c in before.cells) == sorted(o.key for o in outcomes)
    after = plan_request(request, registry, db=db)
    assert [c.key for c in after.cells] == [c.key for c in before.cells]
    assert all(c.done for c in after.cells) and after.totals()["to_compute"] == 0
    # one more seed: the old cells stay done, the new ones are missing
    grown = plan_request(_request(classifier_file, seeds=(0, 1)), registry, db=db)
    assert sum(c.done for c in grown.cells) == len(before.cells) and len(grown.cells) == 2 * len(before.cells)


def _refuse(*args, **kwargs):
    raise AssertionError("a plan built a model")


def test_plan_names_a_trained_classifier_without_training_it(tiny_cifar, tmp_path, no_models):
    request = RunRequest(defenses=("none",), classifier="trained:tiny", n=8, attacks=({"name": "pgd", "steps": 2},),
                         protocols=("adaptive",), progress=False)
    plan = plan_request(request, db=str(tmp_path / "r.db"))
    [cell] = plan.cells
    [need] = cell.artifacts
    assert need.kind == "classifier" and need.exists is False and cell.network.startswith("trained:tiny@")
    assert cell.network.endswith(need.key) and cell.key is not None


@pytest.mark.slow
def test_planned_trained_classifier_key_matches_the_run(tiny_cifar, tmp_path, one_thread):
    request = RunRequest(defenses=("none",), classifier="trained:tiny", n=8, attacks=({"name": "pgd", "steps": 1},),
                         protocols=("adaptive",), progress=False)
    planned = plan_request(request, db=str(tmp_path / "r.db"))
    [outcome] = run_grid(request, open_db(str(tmp_path / "r.db")))
    assert [c.key for c in planned.cells] == [outcome.key]
    again = plan_request(request, db=str(tmp_path / "r.db"))
    assert again.cells[0].done and again.cells[0].artifacts[0].exists is True


def test_cost_from_steps_restarts_eot_and_nfe(tiny_cifar, classifier_file):
    assert attack_passes({"name": "pgd", "steps": 10, "restarts": 2, "eot": 4}) == (80, 0)
    assert attack_passes({"name": "autoattack", "version": "standard"}) == (100 + 900 + 900, 5000)
    assert attack_passes({"name": "square", "queries": 100}) == (0, 100)
    assert attack_passes({"name": "someone-elses"}) is None
    plan = plan_request(_request(classifier_file, variants=("clean",), eps=("8/255",)), _registry())
    cost = {(c.defense, c.protocol): c.cost for c in plan.cells}
    # none: 2 steps + clean and adversarial evaluation, NFE 1; blur (NFE 3) adaptive: through the purifier
    assert cost["none", "adaptive"]["network_passes"] == (2 + 2) * 8
    assert cost["blur", "adaptive"]["network_passes"] == (2 * 3 + 2 * 3) * 8
    assert cost["blur", "non-adaptive"]["network_passes"] == (2 * 1 + 2 * 3) * 8


def test_plan_cli_json_and_table(tiny_cifar, tmp_path, classifier_file):
    args = ["plan", "--defense", "none", "--classifier", classifier_file, "--n", "8", "--attack", "pgd:steps=2",
            "--db", str(tmp_path / "r.db")]
    result = CliRunner().invoke(main, args + ["--format", "json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    [cell] = plan["cells"]
    assert cell["done"] is False and cell["status"] == "missing" and len(cell["key"]) == 32
    assert cell["config"]["classifier"] == cell["network"] and cell["requested"] == ["non-adaptive", "adaptive"]
    assert plan["totals"]["cells"] == 1 and plan["artifacts"][0]["kind"] == "classifier-file"
    table = CliRunner().invoke(main, args)
    assert table.exit_code == 0 and cell["key"] in table.output and "1 cell(s): 0 done" in table.output
    run = CliRunner().invoke(main, ["run", *args[1:], "--no-progress"])
    assert run.exit_code == 0, run.output
    done = json.loads(CliRunner().invoke(main, args + ["--format", "json"]).output)
    assert done["cells"][0]["key"] == cell["key"] and done["cells"][0]["done"] is True


def test_plan_refuses_bad_input_in_one_line(tiny_cifar, classifier_file):
    result = CliRunner().invoke(main, ["plan", "--defense", "nope", "--classifier", classifier_file])
    assert result.exit_code != 0 and "valid:" in result.output and len(result.output.strip().splitlines()) == 1
    both = CliRunner().invoke(main, ["plan", "--defense", "none", "--study", "baselines"])
    assert both.exit_code != 0 and "mutually exclusive" in both.output

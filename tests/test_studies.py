"""Studies as files: every shipped study loads and validates, bad ones are one-line errors, `run --study`
computes what is missing (and a second run nothing), and the report's study index counts done cells."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.analysis.studies import find_study, load_studies, load_study, plan_study
from harness.cli import main
from harness.core.errors import UsageError
from harness.evaluation.runner import DEFAULT_ATTACKS, DEFAULT_PROTOCOLS
from harness.results import open_db

SHIPPED = Path(__file__).resolve().parents[1] / "leaderboards" / "studies"


def test_every_shipped_study_loads_and_validates(harness_home):
    studies = {s.name: s for s in load_studies(SHIPPED)}
    assert {"maep-paper", "fixed-randomness", "robust-training", "baselines"} <= set(studies)
    for study in studies.values():
        assert study.title and study.paper and study.requests() and study.renders
    # the grids are the README's former command lines (so the cells they stored are reused)
    first, variants, transfer = studies["maep-paper"].requests()
    assert first.defenses == ("none", "maep", "disco") and first.attacks == DEFAULT_ATTACKS
    assert first.protocols == DEFAULT_PROTOCOLS and first.n == 512 and first.variants == ("clean",)
    assert variants.variants == ("colored", "corrupt:contrast:1", "corrupt:contrast:5")
    assert variants.protocols == ("non-adaptive",)
    assert transfer.dataset == "fashion-mnist" and transfer.train_datasets == (None, "cifar10")
    [diffpure] = studies["fixed-randomness"].requests()
    assert diffpure.attacks == ({"name": "pgd", "steps": 10, "eot": 4},) and diffpure.n == 64
    at_cells, stronger = studies["fixed-randomness"].analyses  # the cells' own t*, then t* = 0.2
    assert at_cells.requests[0].options == {} and stronger.requests[0].options == {"tstar": 0.2}
    assert at_cells.requests[0].attack["steps"] == stronger.requests[0].attack["steps"] == 10
    robust = studies["robust-training"].requests()
    assert [r.train_seed for r in robust] == [0, 1, 0] and robust[2].defenses == ("none",)
    assert {r.protocols for r in robust} == {("adaptive",)} and {r.n for r in robust} == {512}
    [reps] = studies["robust-training"].analyses
    assert [r.train_seed for r in reps.requests] == [0, 1] and "none" in reps.requests[0].defenses
    assert {r.dataset for r in studies["baselines"].requests()} == {"cifar10", "fashion-mnist"}


def _write(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(f'name = "{name}"\ntitle = "t"\npaper = "p"\n' + body)
    return path


@pytest.mark.parametrize("grid,message", [
    ('defenses = ["none"]\ndefence = "x"\n', "unknown key 'defence'"),
    ('defenses = ["nope"]\n', "unknown defense 'nope'"),
    ('defenses = ["none"]\nattacks = ["pgdd"]\n', "pgd"),
    ('defenses = ["none"]\nprotocols = ["sideways"]\n', "adaptive, adaptive-eot"),
    ('defenses = ["none"]\nn = "many"\n', "'n' must be a whole number"),
])
def test_a_bad_study_is_a_one_line_error(harness_home, tmp_path, grid, message):
    path = _write(tmp_path, "bad", "[[grid]]\n" + grid)
    with pytest.raises(UsageError, match=message) as caught:
        load_study(path)
    assert "\n" not in str(caught.value) and ("valid" in str(caught.value) or "must be" in str(caught.value))


def test_bad_analysis_and_render_and_unknown_study(harness_home, tmp_path):
    with pytest.raises(UsageError, match="unknown analysis kind 'nope'.*valid: fixed-randomness"):
        load_study(_write(tmp_path, "a", '[[grid]]\ndefenses = ["none"]\n[[analysis]]\nkind = "nope"\n'))
    with pytest.raises(UsageError, match="is a undefended"):
        load_study(_write(tmp_path, "b", '[[grid]]\ndefenses = ["none"]\n[[analysis]]\nkind = "fixed-randomness"\n'
                                         'defense = "none"\n'))
    with pytest.raises(UsageError, match="unknown section 'tabel'"):
        load_study(_write(tmp_path, "c", '[[grid]]\ndefenses = ["none"]\n[[render]]\nlabel = "T"\nsection = "tabel"\n'))
    with pytest.raises(UsageError, match="unknown study 'nope'; valid: a, b, c"):
        find_study("nope", tmp_path)


def _tiny_study(folder: Path, classifier: str) -> Path:
    return _write(folder, "tiny", f'''
[[grid]]
defenses = ["none"]
classifier = "{classifier}"
eps = ["4/255", "8/255"]
attacks = ["pgd:steps=2"]
n = 8

[[analysis]]
kind = "representations"
defenses = ["none"]
classifier = "{classifier}"
n = 8
train_n = 16
latents = 8
k = 2
sae_steps = 3

[[render]]
label = "Tiny table"
section = "leaderboard"
''')


def test_run_study_computes_what_is_missing_then_nothing(tiny_cifar, tmp_path, classifier_file, monkeypatch):
    folder = tmp_path / "studies"
    _tiny_study(folder, classifier_file)
    db = str(tmp_path / "r.db")
    args = ["run", "--study", "tiny", "--studies", str(folder), "--db", db, "--no-progress"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.output.count(" done") == 2 and "analysis stored:" in first.output

    import harness.analysis.studies as studies
    import harness.evaluation.runner as runner

    def recompute(*a, **k):
        raise AssertionError("a stored cell or analysis was recomputed")

    monkeypatch.setattr(runner, "build_defense", recompute)
    monkeypatch.setattr(studies, "run_representations", recompute)
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert second.output.count(" skipped") == 2 and "analysis stored" not in second.output
    plan = plan_study(find_study("tiny", folder), db)
    assert [c.done for c in plan.cells] == [True, True]


def test_study_and_defense_are_mutually_exclusive(harness_home, tmp_path):
    result = CliRunner().invoke(main, ["run", "--study", "baselines", "--defense", "none"])
    assert result.exit_code != 0 and "mutually exclusive" in result.output
    assert len(result.output.strip().splitlines()) == 1
    grid = CliRunner().invoke(main, ["run", "--study", "baselines", "--eps", "4/255"])
    assert grid.exit_code != 0 and "drop --eps" in grid.output


def test_list_studies(harness_home):
    result = CliRunner().invoke(main, ["list", "--studies", "--studies-dir", str(SHIPPED)])
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in ("maep-paper", "fixed-randomness", "robust-training", "baselines"))


def test_report_has_a_study_index_of_studies_with_done_cells(tiny_cifar, tmp_path, classifier_file):
    from harness.report.writer import write_reports

    folder = tmp_path / "studies"
    tiny = load_study(_tiny_study(folder, classifier_file))
    other = load_study(_write(folder, "other", f'[[grid]]\ndefenses = ["none"]\nclassifier = "{classifier_file}"\n'
                                               'n = 4\nattacks = ["pgd:steps=1"]\n'))
    engine = open_db(str(tmp_path / "r.db"))
    from harness.analysis.studies import with_run_settings
    from harness.evaluation.runner import run_grid

    [request] = tiny.requests()

    run_grid(with_run_settings(request, progress=False), engine)
    out = tmp_path / "out"
    write_reports(engine, out, studies=[other, tiny])
    text = (out / "studies.md").read_text()
    assert "## tiny: t" in text and "Cells done: 2 of 2" in text and "other" not in text
    assert "Tiny table" in text and "Studies" in (out / "index.html").read_text()
    again = tmp_path / "again"
    write_reports(engine, again, studies=[tiny, other])
    assert (again / "studies.md").read_text() == text  # deterministic

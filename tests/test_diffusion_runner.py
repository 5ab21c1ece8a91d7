"""End to end: `harness train ddpm`, diffpure through the runner under every protocol, the
fixed-randomness study, and its report sections."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from harness.analysis import gain_table, load_records, worst_of_n_accuracy
from harness.cli import main
from harness.report import baseline_defenses, cells_frame
from harness.report.randomness import report_sections
from harness.evaluation.runner import RunRequest, run_grid
from harness.results import Analysis, Cell, Run, SampleResult, open_db

PROTOCOLS = ("non-adaptive", "adaptive", "adaptive-eot", "bpda")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_ddpm_cli_then_run_every_protocol(tiny_cifar, harness_home, tmp_path, classifier_file):
    out = tmp_path / "ddpm-folder"
    result = CliRunner().invoke(main, ["train", "ddpm", "--preset", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    artifact = result.stdout.splitlines()[0]
    assert "/ddpm/" in artifact and (out / "config.json").is_file()
    again = CliRunner().invoke(main, ["train", "ddpm", "--preset", "tiny"])
    assert again.stdout.splitlines()[0] == artifact  # cached, not retrained

    engine = open_db(str(tmp_path / "r.db"))
    options = {"steps": 2, "unet": str(out)}
    request = RunRequest(defenses=("none", "diffpure"), classifier=classifier_file, preset="tiny", n=3, batch_size=3,
                         attacks=({"name": "pgd", "steps": 1, "eot": 2},), protocols=PROTOCOLS,
                         options=options, progress=False)
    outcomes = run_grid(request, engine)
    # `none` has no purifier: one adaptive cell answers non-adaptive, adaptive and bpda
    assert [o.protocol for o in outcomes] == ["adaptive", "adaptive-eot"] + list(PROTOCOLS)
    assert outcomes[0].requested == ("non-adaptive", "adaptive", "bpda")
    assert all(o.status == "done" and o.robust_acc <= o.clean_acc for o in outcomes)
    with Session(engine) as s:
        cell = s.scalars(select(Cell).where(Cell.protocol == "adaptive", Cell.defense == "diffpure")).one()
        assert cell.config["defense"]["options"] == {"steps": 2, "unet": str(out)}
        assert cell.config["defense"]["preset_config"]["tstar"] == 0.3

    db = str(tmp_path / "r.db")
    analysed = CliRunner().invoke(main, ["analyse", "fixed-randomness", "--defense", "diffpure", "--classifier",
                                         classifier_file, "--preset", "tiny", "--option", "steps=2", "--option",
                                         f"unet={out}", "--n", "3", "--steps", "1", "--db", db])
    assert analysed.exit_code == 0, analysed.output
    [record] = load_records(engine)
    assert record["key"] == analysed.stdout.split()[-1] and record["meta"]["options"] == options
    assert {c["norm"] for c in record["record"]["compression"]} == {"l2", "linf"}
    assert record["record"]["provenance"]["unet"]["kind"] == "local"
    with Session(engine) as s:  # stored in the results DB with the provenance of its own run
        row = s.scalars(select(Analysis)).one()
        run = s.get(Run, row.run_id)
        assert row.kind == "fixed-randomness" and run.status == "done" and run.finished_at is not None
        assert run.harness_version and "torch" in run.packages
    assert not (harness_home / "analyses").exists()  # no JSON files any more
    reported = CliRunner().invoke(main, ["report", "--db", db, "--out", str(tmp_path / "cli-report")])
    assert reported.exit_code == 0, reported.output
    assert "Compression rate vs robust gain" in (tmp_path / "cli-report" / "index.html").read_text()
    with Session(engine) as s:  # the runner stores the protocol's per-sample extra; pin it for the check
        eot = s.scalars(select(Cell).where(Cell.protocol == "adaptive-eot", Cell.defense == "diffpure")).one()
        samples = s.scalars(select(SampleResult).where(SampleResult.cell_id == eot.id)).all()
        for i, sample in enumerate(samples):
            sample.label = sample.clean_pred
            sample.extra = {"worst_of": 10, "adv_correct_draws": 10 if i == 0 else 9}
        s.commit()
        key = eot.key
    worst = worst_of_n_accuracy(engine)
    assert worst[key] == pytest.approx(1 / 3) and len(worst) == 2  # diffpure's and none's adaptive-eot
    cells = cells_frame(engine)
    table = gain_table(cells, baseline_defenses(cells), worst_of_n=worst_of_n_accuracy(engine))
    assert list(table["defense"]) == ["diffpure"] and table["fresh_worst"].iloc[0] == pytest.approx(1 / 3)
    sections = report_sections(table, [record], tmp_path / "report")
    assert len(sections) == 3 and (tmp_path / "report" / sections[1].images[0]).is_file()
    assert sections[2].title.startswith("Fixed-randomness analyses") and "<table" in str(sections[2].html)

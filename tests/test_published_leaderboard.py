"""The published leaderboard: `harness report` renders the same bytes from the same store (stamped with the
store's own time, not the clock), writes the default store's report into leaderboards/ and any other's into
the git-ignored leaderboards/out/, and keeps the README's leaderboard block in step with results.db."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.core.errors import UsageError
from harness.report import write_reports
from harness.report.readme import END, START
from harness.results import open_db

FIXTURE = Path(__file__).parent / "fixtures" / "results-schema2.db"
README = f"# project\n\nintro\n\n{START}\nstale text\n{END}\n\n## more\n"


@pytest.fixture()
def store(tmp_path) -> Path:
    """A copy of the committed schema fixture: six finished `none` cells."""
    db = tmp_path / "results.db"
    shutil.copy(FIXTURE, db)
    return db


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_store_renders_the_same_bytes(store, tmp_path):
    engine = open_db(str(store))
    write_reports(engine, tmp_path / "a", studies=[])
    write_reports(engine, tmp_path / "b", studies=[])
    first, second = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert first == second and "index.html" in first and any(k.startswith("cells/") for k in first)
    page = first["index.html"].decode()
    assert "Results as of 2026-12-02 16:17:05 UTC" in page  # the last finished cell, not the clock
    assert "Results as of 2026-12-02 16:17:05 UTC" in first["leaderboard.md"].decode()


def test_readme_block_holds_the_main_tables_top_rows(store, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    write_reports(open_db(str(store)), tmp_path / "leaderboards", studies=[], readme=readme)
    text = readme.read_text()
    assert text.startswith("# project\n\nintro\n\n" + START) and text.endswith(END + "\n\n## more\n")
    assert "stale text" not in text
    block = text[text.index(START):text.index(END)]
    assert "**[Leaderboard](leaderboards/index.html)**" in block
    assert "cifar10 · ℓ∞ · ε = 4/255" in block and "results as of 2026-12-02 16:17:05 UTC" in block
    assert "| Defense" in block and "| none" in block and "Robust" in block
    again = tmp_path / "again.md"
    again.write_text(README)
    write_reports(open_db(str(store)), tmp_path / "leaderboards", studies=[], readme=again)
    assert again.read_text() == text


def test_a_readme_without_the_block_is_refused_before_anything_is_written(store, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no block here\n")
    with pytest.raises(UsageError, match="has no leaderboard block"):
        write_reports(open_db(str(store)), tmp_path / "site", studies=[], readme=readme)
    assert readme.read_text() == "# no block here\n" and not (tmp_path / "site").exists()


def test_default_store_renders_into_leaderboards_others_into_out(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HARNESS_DB", raising=False)
    result = CliRunner().invoke(main, ["report", "--format", "md"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "leaderboards" / "leaderboard.md").is_file()
    shutil.copy(store, tmp_path / "scratch.db")
    (tmp_path / "leaderboards" / "leaderboard.md").unlink()
    result = CliRunner().invoke(main, ["report", "--db", "scratch.db", "--format", "md"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "leaderboards" / "out" / "leaderboard.md").is_file()
    assert not (tmp_path / "leaderboards" / "leaderboard.md").exists()


def test_bad_readme_is_one_line(store, tmp_path):
    result = CliRunner().invoke(main, ["report", "--db", str(store), "--out", str(tmp_path / "o"),
                                       "--readme", str(tmp_path / "missing.md")])
    assert result.exit_code != 0 and "cannot read" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_a_study_run_changing_the_published_data_leaves_the_code_clean():
    from harness.results.provenance import code_dirty

    assert not code_dirty("") and not code_dirty("results.db\nleaderboards/index.html\nleaderboards/cells/ab.csv\n")
    assert code_dirty("harness/report/html.py\n") and code_dirty("results.db\nleaderboards/studies/maep-paper.toml\n")
    assert code_dirty("README.md")

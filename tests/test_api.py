"""``harness.evaluate``: the README's example as written, and the keys of ad-hoc modules."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import torch
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from torch import nn

import harness
from harness.cli import main
from harness.results.database import open_db
from harness.results.schema import Cell, SampleResult

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- readme-example: evaluate -->"


def readme_example() -> str:
    """The python block right after the marker in README.md."""
    text = README.read_text(encoding="utf-8")
    assert MARKER in text
    block = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.DOTALL)
    assert block, "no python block after the readme-example marker"
    return block.group(1)


def _stored(db: Path) -> tuple[int, int]:
    engine = open_db(str(db))
    with Session(engine) as session:
        counts = (session.scalar(select(func.count()).select_from(Cell)),
                  session.scalar(select(func.count()).select_from(SampleResult)))
    engine.dispose()
    return counts


def test_readme_example_runs_resumes_and_reports(tiny_cifar, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    code = readme_example()
    first: dict = {}
    exec(compile(code, "README.md", "exec"), first)
    cells = first["cells"]
    assert isinstance(cells, pd.DataFrame) and len(cells) == 1
    row = cells.iloc[0]
    assert (row.defense, row.protocol, row.answers, row.status) == ("linear", "adaptive", "non-adaptive,adaptive",
                                                                    "done")
    assert _stored(tmp_path / "notebook.db") == (1, 64)

    again: dict = {}
    exec(compile(code, "README.md", "exec"), again)
    assert list(again["cells"].status) == ["skipped"] and list(again["cells"].key) == [row.key]
    assert _stored(tmp_path / "notebook.db") == (1, 64)

    out = tmp_path / "OUT"
    result = CliRunner().invoke(main, ["report", "--db", "notebook.db", "--out", str(out)])
    assert result.exit_code == 0, result.output
    tables = list((out / "tables").glob("*.md"))
    assert tables and any(re.search(r"^\|\s*linear\b", t.read_text(), re.MULTILINE) for t in tables)
    assert ">linear<" in (out / "index.html").read_text()


def _linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def test_module_keys_follow_the_weights(tiny_cifar, db_url, one_thread):
    def key(model: nn.Module) -> tuple[str, str]:
        cells = harness.evaluate(model, n=4, attacks="pgd:steps=1", protocols="adaptive", db=db_url,
                                 name="linear", progress=False)
        (row,) = cells.itertuples()
        return row.key, row.status

    model = _linear(0)
    first, status = key(model)
    assert status == "done"
    assert key(model) == (first, "skipped")
    assert key(_linear(0)) == (first, "skipped")  # a new module with the same weights
    other, status = key(_linear(1))
    assert other != first and status == "done"

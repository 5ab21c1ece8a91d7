"""``harness export``: RobustBench-style model cards for the deterministic entries, and CSV / Parquet tables
of the cells and their per-sample results."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.evaluation.runner import RunRequest, run_grid
from harness.results import open_db


@pytest.fixture()
def store(tiny_cifar, tmp_path, classifier_file, one_thread):
    db = tmp_path / "r.db"
    engine = open_db(str(db))
    run_grid(RunRequest(defenses=("none",), classifier=classifier_file, n=8, batch_size=8, eps=("8/255", "2/255"),
                        attacks=({"name": "pgd", "steps": 2}, {"name": "pgd", "steps": 2, "loss": "margin"}),
                        protocols=("adaptive",), progress=False), engine)
    engine.dispose()
    return db


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_robustbench_cards(store, tmp_path):
    sha = hashlib.sha256(store.read_bytes()).hexdigest()
    result = invoke("export", "--format", "robustbench", "--db", str(store), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    folder = tmp_path / "out" / "model_info" / "cifar10" / "Linf"
    assert sorted(p.name for p in folder.iterdir()) == ["none.json", "none_eps-2_255.json"]
    card = json.loads((folder / "none.json").read_text())
    for name in ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                 "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "unreliable"):
        assert name in card
    assert card["dataset"] == "cifar10" and card["eps"] == "8/255" and card["additional_data"] is False
    assert float(card["autoattack_acc"]) <= float(card["clean_acc"]) and "adaptive protocol" in card["footnote"]
    assert len(card["harness"]["attacks"]) == 2 and card["harness"]["weights_fingerprint"]
    assert hashlib.sha256(store.read_bytes()).hexdigest() == sha  # read only


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_tables(store, tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / fmt
    result = invoke("export", "--format", fmt, "--db", str(store), "--out", str(out))
    assert result.exit_code == 0, result.output
    read = pd.read_csv if fmt == "csv" else pd.read_parquet
    cells, samples = read(out / f"cells.{fmt}"), read(out / f"samples.{fmt}")
    assert len(cells) == 4 and len(samples) == 32 and set(samples["cell_key"]) == set(cells["key"])
    for key, group in samples.groupby("cell_key"):
        row = cells[cells["key"] == key].iloc[0]
        assert group["correct"].mean() == pytest.approx(row["clean_acc"])
        assert group["robust"].mean() == pytest.approx(row["robust_acc"])
    assert cells["weights_fingerprint"].str.len().eq(16).all()


def test_parquet_without_pyarrow_is_one_line(store, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name == "pyarrow":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    result = invoke("export", "--format", "parquet", "--db", str(store), "--out", str(tmp_path / "p"))
    assert result.exit_code == 1 and "parquet export needs pyarrow: pip install 'harness[parquet]'" in result.output


def test_bad_format_names_the_valid_ones(store):
    result = invoke("export", "--format", "xlsx", "--db", str(store))
    assert result.exit_code != 0 and "robustbench" in result.output and "parquet" in result.output

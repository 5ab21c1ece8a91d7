"""``--device`` and ``--executor`` without a GPU or Ray: CUDA is a one-line error naming what is valid
here, ``auto`` is the CPU, the run's provenance names the device, a GPU cell is keyed apart from the CPU
cell (whose key is unchanged), and ``--executor ray`` without Ray says how to install it."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from harness.cli import main
from harness.core.devices import describe_device, resolve_device
from harness.core.errors import UsageError
from harness.core.noise import FixedNoise, FreshNoise, _stream_seed
from harness.evaluation.runner import RunRequest, cell_key, run_grid
from harness.results import Run, open_db
from test_bad_input import invoke, rows, run_args

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: its absence is not tested")


@needs_no_gpu
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_gpu_is_a_clear_error(spec):
    with pytest.raises(UsageError, match="CUDA is not available here.*valid here: cpu, auto"):
        resolve_device(spec)


@needs_no_gpu
def test_auto_is_the_cpu_and_bad_names_list_the_valid_ones():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(UsageError, match="valid: cpu, cuda, cuda:N, auto"):
        resolve_device("gpu0")
    assert describe_device(torch.device("cpu")) == f"cpu ({torch.get_num_threads()} threads)"


def test_fixed_noise_is_the_per_sample_generator_stream_on_the_device():
    """One reseeded generator per device gives exactly the draws of one generator per sample and draw."""
    draws = FixedNoise(7, namespace="defense").draws([4, 0, 9])
    first, second = draws.randn((2, 3), device="cpu"), draws.rand((5,), dtype=torch.float64)
    for row, index in enumerate([4, 0, 9]):
        gen = torch.Generator().manual_seed(_stream_seed(7, "defense", index, 0))
        assert torch.equal(first[row], torch.randn((2, 3), generator=gen))
        gen = torch.Generator().manual_seed(_stream_seed(7, "defense", index, 1))
        assert torch.equal(second[row], torch.rand((5,), generator=gen, dtype=torch.float64))
    fresh = FreshNoise(3).draws([0, 1]).randn((4,), device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(_stream_seed(3, "fresh"))
    assert torch.equal(fresh, torch.randn((2, 4), generator=gen))


def test_a_gpu_device_is_keyed_and_the_cpu_key_is_unchanged():
    config = {name: name for name in ("defense", "classifier", "dataset", "threat", "attack", "protocol", "n",
                                      "seed")}
    assert cell_key(config) != cell_key({**config, "device": "cuda"})
    assert cell_key(config) == cell_key({**config, "entry": "provenance only"})


def _request(classifier_file, **kw) -> RunRequest:
    return RunRequest(defenses=("none",), classifier=classifier_file, n=4, batch_size=4, progress=False,
                      attacks=({"name": "pgd", "steps": 1},), protocols=("adaptive",), **kw)


@needs_no_gpu
def test_run_records_its_device_and_refuses_cuda(tiny_cifar, tmp_path, classifier_file):
    engine = open_db(str(tmp_path / "r.db"))
    with pytest.raises(UsageError, match="CUDA is not available"):
        run_grid(_request(classifier_file, device="cuda"), engine)
    (cpu,) = run_grid(_request(classifier_file), engine)
    (auto,) = run_grid(_request(classifier_file, device="auto", force=True), engine)
    assert cpu.key == auto.key and auto.status == "done"
    with Session(engine) as s:
        assert s.scalars(select(Run.device)).all() == [f"cpu ({torch.get_num_threads()} threads)"] * 2


def test_cli_device_and_executor_errors_are_one_line(tiny_cifar, tmp_path, classifier_file, monkeypatch):
    db = tmp_path / "r.db"
    assert CliRunner().invoke(main, run_args(db, classifier_file)).exit_code == 0
    before = rows(db)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in invoke(*run_args(db, classifier_file, device="cuda:1"))
    assert "'local', 'ray'" in invoke(*run_args(db, classifier_file, executor="dask"))
    assert "--address is for --executor ray" in invoke(*run_args(db, classifier_file, address="10.0.0.1:6379"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    line = invoke(*run_args(db, classifier_file, executor="ray"))
    assert "needs Ray, which is not installed: pip install 'harness[ray]'" in line
    assert rows(db) == before

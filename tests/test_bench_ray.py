"""Benchmark: a grid of 4 cells (``none`` x 2 eps x 2 seeds, PGD-10 on 80 images, a ``convnet-small``)
under ``--executor ray`` with 2 workers vs ``--executor local`` on the same machine.

Run with timing: ``OMP_NUM_THREADS=1 pytest tests/test_bench_ray.py -p no:xdist --benchmark-enable``; the
ratio of the two means (group ``ray-vs-local``) is Ray's speed-up or overhead. Each round writes a fresh
store; the Ray workers are warmed up (torch imported, the cell rebuilt once) before the timed rounds. In
the normal suite each runs once, untimed.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from harness.classifiers.architectures import build_classifier
from harness.classifiers.sources import save_classifier
from harness.evaluation.runner import RunRequest, run_grid
from harness.results import open_db

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'harness[ray]'): no Ray benchmark")


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture()
def small_classifier(tmp_path) -> str:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_classifier("convnet-small", 10)
    return str(save_classifier(model, "convnet-small", 10, tmp_path / "small.safetensors"))


def _grid(benchmark, folder, classifier: str, executor: str) -> None:
    request = RunRequest(defenses=("none",), classifier=classifier, eps=("4/255", "8/255"), seeds=(0, 1), n=80,
                         batch_size=20, attacks=({"name": "pgd", "steps": 10},), protocols=("adaptive",),
                         progress=False, executor=executor)
    stores = itertools.count()

    def fresh_store():
        return (open_db(str(folder / f"{executor}-{next(stores)}.db")),), {}

    def run(engine):
        outcomes = run_grid(request, engine)
        assert [o.status for o in outcomes] == ["done"] * 4

    benchmark.pedantic(run, setup=fresh_store, rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="ray-vs-local")
def test_bench_local(benchmark, tiny_cifar, tmp_path, small_classifier, one_thread):
    _grid(benchmark, tmp_path, small_classifier, "local")


@pytest.mark.benchmark(group="ray-vs-local")
def test_bench_ray(benchmark, tiny_cifar, tmp_path, small_classifier, one_thread):
    _grid(benchmark, tmp_path, small_classifier, "ray")

"""Shared fixtures: an isolated harness home, a tiny synthetic CIFAR-10, the real JPEG copy, one torch
thread, a saved untrained classifier, and results stores on both back ends (``db_url``: SQLite, and
PostgreSQL when ``$HARNESS_TEST_POSTGRES_URL`` names a server, e.g. the one ``.ci/run`` starts)."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_imagefolder(root: Path, per_class: int, seed: int = 0) -> Path:
    """A learnable synthetic ImageFolder: each class has its own mean colour, plus noise."""
    rng = np.random.default_rng(seed)
    palette = rng.uniform(40, 215, size=(len(CLASSES), 3))
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = palette[c] + rng.normal(0, 25, size=(32, 32, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture()
def harness_home(tmp_path, monkeypatch) -> Path:
    """Point every harness folder at a fresh temp dir (data, artifacts, results)."""
    home = tmp_path / "home"
    monkeypatch.setenv("HARNESS_HOME", str(home))
    monkeypatch.delenv("HARNESS_DATA", raising=False)
    monkeypatch.delenv("HARNESS_ARTIFACTS", raising=False)
    monkeypatch.delenv("HARNESS_DB", raising=False)
    monkeypatch.delenv("HARNESS_DATA_MIRROR", raising=False)
    return home


@pytest.fixture()
def tiny_cifar(harness_home, tmp_path) -> Path:
    """A synthetic 10-class 'cifar10' (8 train / 8 test images per class) imported into the home."""
    from harness.data import import_dataset

    folder = write_imagefolder(tmp_path / "imagefolder", per_class=8)
    import_dataset("cifar10", folder, progress=False)
    return folder


@pytest.fixture(scope="session")
def real_data_root(tmp_path_factory) -> Path:
    """The CIFAR-10 JPEG copy from the local mirror, imported once per session."""
    from harness.data import load_split
    from harness.data.datasets import mirror_dirs

    folders = [str(d) for d in mirror_dirs() + [REPO.parent / "shared" / "data"]
               if (d / "cifar10-jpeg.tar.gz").is_file()]
    if not folders:
        pytest.skip("the CIFAR-10 mirror (../shared/data) is not available")
    mirror = folders[0]
    root = tmp_path_factory.mktemp("real-data")
    old = os.environ.get("HARNESS_DATA_MIRROR")
    os.environ["HARNESS_DATA_MIRROR"] = mirror
    try:
        load_split("cifar10", "test", root)
    finally:
        if old is None:
            os.environ.pop("HARNESS_DATA_MIRROR")
        else:
            os.environ["HARNESS_DATA_MIRROR"] = old
    return root


@pytest.fixture()
def one_thread():
    """Run the test on one torch thread (the machine is shared; batched CPU kernels differ otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def classifier_file(tmp_path) -> str:
    """An untrained ``convnet-tiny`` for 10 classes (initialised from seed 0), saved as safetensors."""
    from harness.classifiers.sources import save_classifier
    from harness.classifiers.architectures import build_classifier

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_classifier("convnet-tiny", 10)
    return str(save_classifier(model, "convnet-tiny", 10, tmp_path / "c.safetensors"))


@contextlib.contextmanager
def serve(files: dict[str, bytes]) -> Iterator[str]:
    """Serve ``files`` (URL path -> body) on a loopback port; yields the base URL."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- results stores on both back ends ---------------------------------------------------------------
#: a PostgreSQL URL (``postgresql+psycopg://user@host:port/db``) on which the tests may create schemas
POSTGRES_ENV = "HARNESS_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")


def postgres_url() -> str:
    """``$HARNESS_TEST_POSTGRES_URL``, or skip the test with the reason."""
    url = os.environ.get(POSTGRES_ENV, "")
    if not url:
        pytest.skip(f"PostgreSQL back end not tested: ${POSTGRES_ENV} is not set (.ci/run starts a server and "
                    f"sets it)")
    return url


@contextlib.contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A new, empty schema on the PostgreSQL server at ``url``; yields a URL whose connections use it
    (``search_path``), in a session time zone other than UTC (times must not depend on it), and drops it
    with everything in it at the end."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    name = f"harness_test_{secrets.token_hex(6)}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as connection:
        connection.execute(text(f"CREATE SCHEMA {name}"))
    try:
        yield make_url(url).update_query_dict(
            {"options": f"-csearch_path={name} -ctimezone=America/New_York"}).render_as_string(
            hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text("SET lock_timeout = '10s'"))  # a test that left a transaction open
            connection.execute(text(f"DROP SCHEMA {name} CASCADE"))
        admin.dispose()


@contextlib.contextmanager
def results_store(backend: str, folder: Path) -> Iterator[str]:
    """The URL (or file path) of a new, empty results store on ``backend``."""
    if backend == "sqlite":
        yield str(folder / "r.db")
        return
    with postgres_schema(postgres_url()) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path) -> Iterator[str]:
    """A new results store on each back end (SQLite file; PostgreSQL schema, or skipped with the reason)."""
    with results_store(request.param, tmp_path) as url:
        yield url


@pytest.fixture(scope="module", params=BACKENDS)
def module_db_url(request, tmp_path_factory) -> Iterator[str]:
    """:func:`db_url`, shared by the tests of a module."""
    with results_store(request.param, tmp_path_factory.mktemp("store")) as url:
        yield url


def bench_model(batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Generator]:
    """The benchmarks' model (``convnet-small`` from seed 0, frozen, on one torch thread), ``batch`` random
    CIFAR-sized images, and the generator that drew them (for further draws)."""
    from harness.classifiers.architectures import build_classifier

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_classifier("convnet-small", 10).eval().requires_grad_(False)
    return model, torch.rand((batch, 3, 32, 32), generator=gen), gen

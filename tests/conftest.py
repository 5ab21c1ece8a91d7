"""Shared fixtures: an isolated harness home, a tiny synthetic CIFAR-10, the real JPEG copy, one torch
thread, and a saved untrained classifier."""

from __future__ import annotations

import contextlib
import os
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

"""IDX releases (MNIST, Fashion-MNIST): decoding, corrupt files, fetch with md5 checks, mirror, the real
Fashion-MNIST of the Debian package ``dataset-fashion-mnist`` (skipped where it is not installed)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data import dataset_info, fetch_dataset, import_dataset, load_split
from harness.data.catalog import catalog_entry
from harness.data.formats import parse_idx
from harness.core.errors import MissingArtifactError, UsageError
from test_data import assert_split, leftovers, serve

REPO = Path(__file__).resolve().parents[1]
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# The official Fashion-MNIST content (the Debian package re-gzips the official files; same bytes inside).
FASHION_FINGERPRINTS = {"train": "1f243a60b4b748a4", "test": "9a494dc49efeb996"}
Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path / "default-root"))
    for var in ("HARNESS_DATA_MIRROR", "HARNESS_DATA_URL_FASHION_MNIST", "HARNESS_DATA_URL_MNIST"):
        monkeypatch.delenv(var, raising=False)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """An IDX file of ``array`` (unsigned bytes unless ``type_code`` says otherwise), uncompressed."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_code]
    return (bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            + array.astype(dtype).tobytes())


def make_idx_release(folder: Path, gz: bool = True, seed: int = 0, n: tuple[int, int] = (6, 4)) -> Arrays:
    """The four (Fashion-)MNIST files with random content in ``folder``; returns the expected arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for (split, (images_file, labels_file)), count in zip(FILES.items(), n):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        for name, array in ((images_file, images), (labels_file, labels)):
            blob = idx_bytes(array)
            if gz:
                (folder / name).write_bytes(gzip.compress(blob))
            else:
                (folder / name.removesuffix(".gz")).write_bytes(blob)
        expected[split] = (images.reshape(-1, 1, 28, 28), labels.astype(np.int64))
    return expected


# --- decoding -------------------------------------------------------------------------------------

def test_catalog_entries():
    fashion, mnist = dataset_info("fashion-mnist"), dataset_info("mnist")
    assert (fashion.num_classes, fashion.image_shape) == (10, (1, 28, 28))
    assert fashion.classes == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                               "Sneaker", "Bag", "Ankle boot")
    assert mnist.classes == tuple("0123456789") and mnist.image_shape == (1, 28, 28)
    assert fashion.hflip and not mnist.hflip  # a mirrored digit is not the same digit
    assert sorted(catalog_entry("mnist").official.md5) == sorted(f for pair in FILES.values() for f in pair)


@pytest.mark.parametrize("form", ["gz folder", "plain folder", "tar.gz of a parent folder"])
def test_import_idx_release(tmp_path, form):
    src = tmp_path / "src" / "fashion"
    expected = make_idx_release(src, gz=form != "plain folder")
    path = src
    if form.startswith("tar"):
        path = tmp_path / "fashion.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(tmp_path / "src", arcname="data")
    root = tmp_path / "root"
    import_dataset("fashion-mnist", path, root=root, progress=False)
    for split in ("train", "test"):
        loaded = load_split("fashion-mnist", split, root=root)
        assert_split(loaded, *expected[split])
        assert loaded.source == "fashion-mnist official (IDX)"
        assert loaded.info.classes[0] == "T-shirt/top" and loaded.info.image_shape == (1, 28, 28)
    meta = json.loads((root / "fashion-mnist" / "meta.json").read_text())
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    assert meta["files_sha256"] == files and len(files) == 4
    assert leftovers(root) == []


def _corrupt(folder: Path, kind: str) -> None:
    images = folder / "t10k-images-idx3-ubyte.gz"
    blob = gzip.decompress(images.read_bytes())
    if kind == "damaged gzip":
        images.write_bytes(images.read_bytes()[:40])
    elif kind == "not idx":
        images.write_bytes(gzip.compress(b"\x89PNG" + blob[4:]))
    elif kind == "truncated":
        images.write_bytes(gzip.compress(blob[:-5]))
    elif kind == "trailing bytes":
        images.write_bytes(gzip.compress(blob + b"\0"))
    elif kind == "labels as images":
        shutil.copy(folder / "t10k-labels-idx1-ubyte.gz", images)
    elif kind == "wrong size":
        images.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 32, 32), np.uint8))))
    elif kind == "count mismatch":
        images.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 28, 28), np.uint8))))
    elif kind == "label out of range":
        (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.array([0, 1, 2, 10]))))


@pytest.mark.parametrize("kind, message", [
    ("damaged gzip", "t10k-images-idx3-ubyte.gz is a damaged gzip file"),
    ("not idx", "is not an IDX file \\(magic number 0x89504e47"),
    ("truncated", "3131 data bytes, but the header's shape \\(4, 28, 28\\) needs 3136; the file is truncated"),
    ("trailing bytes", "3137 data bytes.*truncated or corrupt"),
    ("labels as images", "expected fashion-mnist images \\(N, 28, 28\\) of unsigned bytes \\(magic 2051\\)"),
    ("wrong size", "IDX array \\(4, 32, 32\\)"),
    ("count mismatch", "test: 4 labels .* for 3 images"),
    ("label out of range", "test labels span 0..10, expected 0..9"),
])
def test_corrupt_idx_files_are_rejected(tmp_path, kind, message):
    make_idx_release(tmp_path / "src")
    _corrupt(tmp_path / "src", kind)
    root = tmp_path / "root"
    with pytest.raises(UsageError, match=message):
        import_dataset("fashion-mnist", tmp_path / "src", root=root, progress=False)
    assert not (root / "fashion-mnist").exists() and leftovers(root) == []


def test_parse_idx_other_types():
    shorts = np.array([[-2, 300], [7, -32768]], dtype=np.int16)
    parsed = parse_idx(gzip.compress(idx_bytes(shorts, 0x0B)), "shorts")
    assert parsed.dtype == np.int16 and parsed.dtype.isnative and np.array_equal(parsed, shorts)
    floats = np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)
    assert np.array_equal(parse_idx(idx_bytes(floats, 0x0D), "floats"), floats)
    with pytest.raises(UsageError, match="x: IDX header truncated"):
        parse_idx(b"\0\0\x08\x03\0\0", "x")
    with pytest.raises(UsageError, match="magic number 0xempty"):
        parse_idx(b"", "x")


# --- fetch ----------------------------------------------------------------------------------------

def test_fetch_idx_release_from_loopback_server(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    src = tmp_path / "src"
    expected = make_idx_release(src)
    bodies = {p.name: p.read_bytes() for p in src.iterdir()}
    md5 = {name: hashlib.md5(body).hexdigest() for name, body in bodies.items()}
    root = tmp_path / "root"
    with serve({f"/fm/{name}": body for name, body in bodies.items()}) as base:
        url = f"{base}/fm"  # the folder URL; a trailing slash is optional
        with pytest.raises(UsageError, match="checksum mismatch for .*/fm/train-images-idx3-ubyte.gz") as err:
            fetch_dataset("fashion-mnist", root=root, url=url, progress=False)  # default: the official md5s
        assert "8d4fb7e6c68d591d4c3dfef9ec88bf0d" in str(err.value)
        assert not (root / "fashion-mnist").exists() and leftovers(root) == []
        with pytest.raises(UsageError, match="give md5 as a mapping file name -> digest"):
            fetch_dataset("fashion-mnist", root=root, url=url, progress=False, md5="0" * 32)
        with pytest.raises(UsageError, match="no release file named x.gz; valid: train-images-idx3-ubyte.gz"):
            fetch_dataset("fashion-mnist", root=root, url=url, progress=False, md5={**md5, "x.gz": "0"})
        with pytest.raises(UsageError, match="no sha256 given for t10k-labels-idx1-ubyte.gz"):
            sha = {n: hashlib.sha256(b).hexdigest() for n, b in bodies.items() if not n.startswith("t10k-l")}
            fetch_dataset("fashion-mnist", root=root, url=url, progress=False, sha256=sha)
        with pytest.raises(UsageError, match="could not download .*/nowhere/train-images.*harness data import"):
            fetch_dataset("fashion-mnist", root=root, url=f"{base}/nowhere/", progress=False, md5=md5)
        assert leftovers(root) == []

        assert fetch_dataset("fashion-mnist", root=root, url=url, progress=False, md5=md5) == root / "fashion-mnist"
        for split in ("train", "test"):
            assert_split(load_split("fashion-mnist", split, root=root), *expected[split])
        meta = json.loads((root / "fashion-mnist" / "meta.json").read_text())
        assert meta["url"] == meta["original"] == f"{url}/" and meta["source"] == "fashion-mnist official (IDX)"
        assert meta["files_sha256"] == {n: hashlib.sha256(b).hexdigest() for n, b in bodies.items()}

        monkeypatch.setenv("HARNESS_DATA_URL_FASHION_MNIST", f"{url}/")  # URL from the environment
        fetch_dataset("fashion-mnist", root=tmp_path / "root2", progress=False, md5=md5)
        assert load_split("fashion-mnist", "test", root=tmp_path / "root2").fingerprint == \
            load_split("fashion-mnist", "test", root=root).fingerprint
    assert leftovers(root) == [] and leftovers(tmp_path / "root2") == []


def test_fetch_imagenet_explains_import(tmp_path):
    with pytest.raises(UsageError, match="cannot download it: ImageNet .* has no public download.*image-net.org"
                                         ".*`harness data import imagenet FOLDER`"):
        fetch_dataset("imagenet", root=tmp_path / "root", progress=False)
    with pytest.raises(MissingArtifactError, match="image-net.org.*`harness data import imagenet PATH`") as err:
        load_split("imagenet", "test", root=tmp_path / "root")
    assert "harness data fetch" not in str(err.value)


# --- mirror, the real Fashion-MNIST, env.sh -------------------------------------------------------

def test_mirror_auto_import_of_idx_folder(tmp_path, monkeypatch):
    mirror = tmp_path / "datasets"
    expected = make_idx_release(mirror / "fashion-mnist")
    monkeypatch.setenv("HARNESS_DATA_MIRROR", f"{tmp_path / 'shared'},{mirror}")
    assert_split(load_split("fashion-mnist", "test", root=tmp_path / "root"), *expected["test"])
    with pytest.raises(MissingArtifactError, match="has none of them"):
        load_split("mnist", "test", root=tmp_path / "root")


needs_fashion = pytest.mark.skipif(not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
                                   reason=f"Fashion-MNIST is not installed in {DEBIAN_FASHION} "
                                          f"(apt-get install dataset-fashion-mnist)")


@needs_fashion
def test_real_fashion_mnist_from_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_MIRROR", str(DEBIAN_FASHION.parent))
    root = tmp_path / "root"
    test = load_split("fashion-mnist", "test", root=root)  # auto-imported from the mirror
    train = load_split("fashion-mnist", "train", root=root)
    assert {"train": train.fingerprint, "test": test.fingerprint} == FASHION_FINGERPRINTS
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert torch.equal(test.labels.bincount(), torch.full((10,), 1000))
    assert test.source == "fashion-mnist official (IDX)"
    assert abs(train.float_images().mean().item() - 0.2860) < 1e-3


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "activate").is_file(), reason="no .venv")
def test_env_script_appends_system_datasets_once(tmp_path):
    script = f'. "{REPO / "scripts" / "env.sh"}"; . "{REPO / "scripts" / "env.sh"}"; echo "$HARNESS_DATA_MIRROR"'
    env = {**os.environ, "HARNESS_DATA_MIRROR": str(tmp_path)}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    want = f"{tmp_path},/usr/share/datasets" if Path("/usr/share/datasets").is_dir() else str(tmp_path)
    assert out.strip() == want

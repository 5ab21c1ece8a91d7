"""harness.data: import (official pickles, ImageFolder), store, fingerprints, fetch, mirror. Tiny data only."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import serve
from harness.data import (DatasetInfo, Split, dataset_info, dataset_names, dataset_status, fetch_dataset,
                          import_dataset, load_split, disk)
from harness.core.errors import MissingArtifactError, UsageError

CIFAR10 = dataset_info("cifar10").classes
SAMPLES = Path(__file__).parents[1].parent / "shared/data/samples/cifar10"
Arrays = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (images NCHW uint8, labels int64)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Never touch the real data root, a real mirror or a real download URL."""
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path / "default-root"))
    for var in ("HARNESS_DATA_MIRROR", "HARNESS_DATA_URL_CIFAR10", "HARNESS_DATA_URL_CIFAR100"):
        monkeypatch.delenv(var, raising=False)


# --- builders of tiny inputs ----------------------------------------------------------------------

def _dump(obj, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10(parent: Path, per_batch: int = 3, seed: int = 0) -> tuple[Path, Arrays]:
    """A tiny official-format ``cifar-10-batches-py`` folder; returns it and the expected arrays."""
    rng = np.random.default_rng(seed)
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    parts: dict[str, list] = {"train": [], "test": []}
    for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        _dump({"batch_label": file, "data": data, "labels": labels,
               "filenames": [f"{file}_{i}.png" for i in range(per_batch)]}, folder / file)
        parts["test" if file == "test_batch" else "train"].append((data, labels))
    _dump({"label_names": list(CIFAR10), "num_cases_per_batch": per_batch, "num_vis": 3072},
          folder / "batches.meta")
    expected = {split: (np.concatenate([d for d, _ in p]).reshape(-1, 3, 32, 32),
                        np.concatenate([np.array(l, dtype=np.int64) for _, l in p])) for split, p in parts.items()}
    return folder, expected


def make_cifar100(parent: Path, with_meta: bool = True) -> tuple[Path, Arrays]:
    """A tiny official-format ``cifar-100-python`` folder, with bytes keys as python-2 pickles have."""
    rng = np.random.default_rng(1)
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    expected = {}
    for split, n in (("train", 5), ("test", 4)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(x) for x in rng.integers(0, 100, n)]
        _dump({b"data": data, b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]}, folder / split)
        expected[split] = (data.reshape(-1, 3, 32, 32), np.array(fine, dtype=np.int64))
    if with_meta:
        _dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
               b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, folder / "meta")
    return folder, expected


def tar_gz(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Write HWC uint8 ``pixels`` as a PNG (lossless)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_imagefolder(root: Path, classes: dict[str, list[str]], seed: int = 0) -> dict[str, np.ndarray]:
    """``root/{train,test}/<class>/<file>`` tiny PNGs; returns the CHW pixels of each relative path."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for split in ("train", "test"):
        for cls, files in classes.items():
            for file in files:
                hwc = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                write_png(root / split / cls / file, hwc)
                pixels[f"{split}/{cls}/{file}"] = hwc.transpose(2, 0, 1)
    return pixels


def assert_split(split: Split, images: np.ndarray, labels: np.ndarray) -> None:
    assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    assert split.images.is_contiguous()
    np.testing.assert_array_equal(split.images.numpy(), images)
    np.testing.assert_array_equal(split.labels.numpy(), labels)
    assert split.fingerprint == disk.fingerprint(images, labels)


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders an import may have left in ``root``."""
    return [p.name for p in root.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


# --- catalog --------------------------------------------------------------------------------------

def test_catalog_and_unknown_names():
    assert dataset_names() == ["cifar10", "cifar100", "fashion-mnist", "mnist", "imagenet"]
    assert dataset_info("cifar10") == DatasetInfo("cifar10", 10, (3, 32, 32), CIFAR10)
    assert CIFAR10[0] == "airplane" and CIFAR10[-1] == "truck"
    assert dataset_info("cifar100").num_classes == 100
    for call in (lambda: dataset_info("svhn"), lambda: load_split("tiny-imagenet", "test")):
        with pytest.raises(UsageError, match="cifar10, cifar100, fashion-mnist, mnist, imagenet"):
            call()
    with pytest.raises(UsageError, match="train, test"):
        load_split("cifar10", "val")


# --- official python-pickle format ----------------------------------------------------------------

@pytest.mark.parametrize("form", ["archive", "folder", "parent folder"])
def test_import_official_cifar10(tmp_path, form):
    folder, expected = make_cifar10(tmp_path / "src")
    path = {"archive": lambda: tar_gz(folder, tmp_path / "cifar-10-python.tar.gz"),
            "folder": lambda: folder, "parent folder": lambda: folder.parent}[form]()
    root = tmp_path / "root"
    assert import_dataset("cifar10", path, root=root, progress=False) == root / "cifar10"
    for split in ("train", "test"):
        loaded = load_split("cifar10", split, root=root)
        assert_split(loaded, *expected[split])
        assert loaded.split == split and loaded.info == dataset_info("cifar10")
        assert loaded.source == "cifar10 official (python pickle)"
    meta = json.loads((root / "cifar10" / "meta.json").read_text())
    assert meta["original"] == path.name
    assert meta["archive_sha256"] == (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None)
    assert leftovers(root) == []


def test_float_images(tmp_path):
    folder, expected = make_cifar10(tmp_path / "src")
    import_dataset("cifar10", folder, root=tmp_path / "root", progress=False)
    test = load_split("cifar10", "test", root=tmp_path / "root")
    floats = test.float_images()
    assert floats.dtype == torch.float32 and floats.shape == (3, 3, 32, 32)
    assert torch.equal(floats, torch.from_numpy(expected["test"][0]).float() / 255)
    assert torch.equal(test.float_images(torch.tensor([2, 0])), floats[[2, 0]])
    assert 0 <= floats.min() and floats.max() <= 1


@pytest.mark.parametrize("with_meta", [True, False])
def test_import_official_cifar100(tmp_path, with_meta):
    folder, expected = make_cifar100(tmp_path / "src", with_meta=with_meta)
    root = tmp_path / "root"
    import_dataset("cifar100", tar_gz(folder, tmp_path / "cifar-100-python.tar.gz"), root=root, progress=False)
    for split in ("train", "test"):
        loaded = load_split("cifar100", split, root=root)
        assert_split(loaded, *expected[split])
        assert loaded.info.num_classes == 100 and loaded.source == "cifar100 official (python pickle)"
        assert loaded.info.classes[7] == ("fine7" if with_meta else "class_07")


def test_official_archive_of_other_dataset_is_rejected(tmp_path):
    folder, _ = make_cifar100(tmp_path / "src")
    with pytest.raises(UsageError, match="data_batch_1.*ImageFolder"):
        import_dataset("cifar10", folder, root=tmp_path / "root", progress=False)


def test_pickle_that_runs_code_is_refused(tmp_path):
    folder, _ = make_cifar10(tmp_path / "src")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    _dump({"data": Evil(), "labels": []}, folder / "data_batch_1")
    with pytest.raises(UsageError, match="refusing to load"):
        import_dataset("cifar10", folder, root=tmp_path / "root", progress=False)
    assert not marker.exists() and not (tmp_path / "root" / "cifar10").exists()


# --- ImageFolder ----------------------------------------------------------------------------------

def test_imagefolder_order_and_standard_class_mapping(tmp_path):
    # Folder names match class names case-insensitively (a subset is fine) -> standard labels;
    # samples go class by class in label order, files by name with numbers compared numerically.
    src = tmp_path / "jpeg-copy"
    pixels = make_imagefolder(src, {"truck": ["b.png", "a.png"], "Cat": ["10.png", "2.png", "1.png"],
                                    "airplane": ["x.png"]})
    root = tmp_path / "root"
    import_dataset("cifar10", src, root=root, progress=False)
    order = [("airplane", "x.png", 0), ("Cat", "1.png", 3), ("Cat", "2.png", 3), ("Cat", "10.png", 3),
             ("truck", "a.png", 9), ("truck", "b.png", 9)]
    for split in ("train", "test"):
        loaded = load_split("cifar10", split, root=root)
        images = np.stack([pixels[f"{split}/{cls}/{file}"] for cls, file, _ in order])
        assert_split(loaded, images, np.array([label for *_, label in order]))
        assert loaded.info.classes == CIFAR10
        assert loaded.source == "cifar10 ImageFolder folder jpeg-copy"


def test_imagefolder_other_class_names_use_sorted_order(tmp_path):
    names = [f"c{i}" for i in range(10)]  # natural order: c0, c1, ..., c9
    src = tmp_path / "src"
    make_imagefolder(src, {name: ["0.png"] for name in reversed(names)})
    import_dataset("cifar10", src, root=tmp_path / "root", progress=False)
    loaded = load_split("cifar10", "train", root=tmp_path / "root")
    assert loaded.info.classes == tuple(names)
    assert loaded.labels.tolist() == list(range(10))

    few = tmp_path / "few"
    make_imagefolder(few, {"dogs": ["0.png"], "cats": ["0.png"]})
    with pytest.raises(UsageError, match="exactly 10 folders"):
        import_dataset("cifar10", few, root=tmp_path / "root", progress=False)


def test_imagefolder_needs_both_splits_and_right_size(tmp_path):
    src = tmp_path / "src"
    write_png(src / "train" / "cat" / "0.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(UsageError, match="no test/<class>/ or val/<class>/ images"):
        import_dataset("cifar10", src, root=tmp_path / "root", progress=False)
    write_png(src / "test" / "cat" / "0.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(UsageError, match="16x16, expected 32x32"):
        import_dataset("cifar10", src, root=tmp_path / "root", progress=False)
    assert not (tmp_path / "root" / "cifar10").exists()


@pytest.mark.parametrize("kind", ["tar.gz", "tar", "zip"])
def test_imagefolder_archives(tmp_path, kind):
    src = tmp_path / "cifar10-tiny"
    make_imagefolder(src, {"dog": ["1.png", "0.png"], "bird": ["0.png"]})
    (src / "README.txt").write_text("not an image")  # ignored
    import_dataset("cifar10", src, root=tmp_path / "from-folder", progress=False)
    archive = tmp_path / f"cifar10-tiny.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for file in sorted(src.rglob("*.png")):
                zf.write(file, f"wrapper/{file.relative_to(src).as_posix()}")
            zf.writestr("__MACOSX/wrapper/train/dog/._0.png", b"junk")
    else:
        with tarfile.open(archive, "w:gz" if kind == "tar.gz" else "w") as tar:
            tar.add(src, arcname="cifar10-tiny")
    import_dataset("cifar10", archive, root=tmp_path / "from-archive", progress=False)
    for split in ("train", "test"):
        a = load_split("cifar10", split, root=tmp_path / "from-folder")
        b = load_split("cifar10", split, root=tmp_path / "from-archive")
        assert a.fingerprint == b.fingerprint and a.labels.tolist() == [2, 5, 5]
        assert b.source == f"cifar10 ImageFolder archive cifar10-tiny.{kind}"


def test_shared_samples_import_as_imagefolder(tmp_path):
    """The 20 exact CIFAR-10 test images (``cifar10_{idx}_{label}.png``) as an ImageFolder."""
    files = sorted(SAMPLES.glob("cifar10_*.png"))
    if not files:
        pytest.skip(f"no samples in {SAMPLES}")
    src = tmp_path / "samples-folder"
    expected = []
    for file in files:
        _, idx, label = file.stem.split("_")
        pixels = np.asarray(Image.open(file).convert("RGB"))
        for split in ("train", "test"):
            write_png(src / split / CIFAR10[int(label)] / f"{int(idx)}.png", pixels)
        expected.append((int(label), int(idx), pixels.transpose(2, 0, 1)))
    expected.sort(key=lambda e: e[:2])  # class by class, then by file name
    import_dataset("cifar10", src, root=tmp_path / "root", progress=False)
    test = load_split("cifar10", "test", root=tmp_path / "root")
    assert_split(test, np.stack([e[2] for e in expected]), np.array([e[0] for e in expected]))
    assert test.labels.tolist() == sorted(int(f.stem.split("_")[2]) for f in files)


# --- fingerprints and store -----------------------------------------------------------------------

def test_fingerprint_is_content_hash_per_split(tmp_path):
    folder, expected = make_cifar10(tmp_path / "src")
    root = tmp_path / "root"
    import_dataset("cifar10", folder, root=root, progress=False)
    first = {s: load_split("cifar10", s, root=root) for s in ("train", "test")}
    test = first["test"]
    digest = hashlib.sha256(test.images.numpy().tobytes() + test.labels.numpy().tobytes()).hexdigest()
    assert test.fingerprint == digest[:16] and re.fullmatch(r"[0-9a-f]{16}", test.fingerprint)
    assert first["train"].fingerprint != test.fingerprint

    import_dataset("cifar10", folder, root=root, progress=False)  # same content: same fingerprints
    assert {s: load_split("cifar10", s, root=root).fingerprint for s in first} == \
        {s: first[s].fingerprint for s in first}

    batch = pickle.loads((folder / "test_batch").read_bytes())
    batch["data"][1, 100] ^= 1  # one channel value of one pixel
    _dump(batch, folder / "test_batch")
    import_dataset("cifar10", folder, root=root, progress=False)
    assert load_split("cifar10", "test", root=root).fingerprint != test.fingerprint
    assert load_split("cifar10", "train", root=root).fingerprint == first["train"].fingerprint


def test_interrupted_import_keeps_previous_copy(tmp_path, monkeypatch):
    folder, _ = make_cifar10(tmp_path / "src")
    root = tmp_path / "root"
    import_dataset("cifar10", folder, root=root, progress=False)
    before = load_split("cifar10", "train", root=root).fingerprint
    other, _ = make_cifar10(tmp_path / "other", seed=5)
    real_write = disk._write_split

    def write_then_die(*args):
        real_write(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(disk, "_write_split", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        import_dataset("cifar10", other, root=root, progress=False)
    monkeypatch.undo()
    assert load_split("cifar10", "train", root=root).fingerprint == before
    assert leftovers(root) == []


def test_damaged_store_says_how_to_fix(tmp_path):
    folder, _ = make_cifar10(tmp_path / "src")
    root = tmp_path / "root"
    import_dataset("cifar10", folder, root=root, progress=False)
    (root / "cifar10" / "test.npz").write_bytes(b"garbage")
    with pytest.raises(MissingArtifactError, match="harness data import cifar10"):
        load_split("cifar10", "test", root=root)


def test_dataset_status(tmp_path):
    folder, _ = make_cifar10(tmp_path / "src")
    import_dataset("cifar10", folder, root=tmp_path / "root", progress=False)
    rows = {row["name"]: row for row in dataset_status(tmp_path / "root")}
    assert list(rows) == ["cifar10", "cifar100", "fashion-mnist", "mnist", "imagenet"]
    assert rows["fashion-mnist"]["shape"] == "1x28x28" and rows["imagenet"]["classes"] == 1000
    c10, c100 = rows["cifar10"], rows["cifar100"]
    assert c10["present"] and c10["n_train"] == 15 and c10["n_test"] == 3
    assert c10["source"] == "cifar10 official (python pickle)"
    assert c10["fingerprints"]["test"] == load_split("cifar10", "test", root=tmp_path / "root").fingerprint
    assert c10["path"] == str(tmp_path / "root" / "cifar10")
    assert not c100["present"] and c100["n_train"] is None and c100["fingerprints"] == {}


def test_default_root_comes_from_environment(tmp_path):
    folder, _ = make_cifar10(tmp_path / "src")
    assert import_dataset("cifar10", folder, progress=False) == tmp_path / "default-root" / "cifar10"
    assert load_split("cifar10", "test").images.shape == (3, 3, 32, 32)


# --- missing data, mirror, fetch ------------------------------------------------------------------

def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(MissingArtifactError) as err:
        load_split("cifar10", "test", root=tmp_path / "root")
    message = str(err.value)
    assert "`harness data fetch cifar10`" in message and "`harness data import cifar10 PATH`" in message
    assert "HARNESS_DATA_MIRROR" in message and str(tmp_path / "root") in message
    with pytest.raises(UsageError, match="does not exist"):
        import_dataset("cifar10", tmp_path / "nowhere", root=tmp_path / "root")


def test_mirror_auto_import(tmp_path, monkeypatch, caplog):
    folder, expected = make_cifar10(tmp_path / "src")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    tar_gz(folder, mirror / "cifar-10-python.tar.gz")
    jpeg_like = tmp_path / "jpeg-like"
    make_imagefolder(jpeg_like, {"cat": ["0.png"]})
    with tarfile.open(mirror / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(jpeg_like, arcname=".")
    monkeypatch.setenv("HARNESS_DATA_MIRROR", f"{tmp_path / 'not-there'}, {mirror}")
    root = tmp_path / "root"
    with caplog.at_level(logging.INFO, logger="harness.data"):
        test = load_split("cifar10", "test", root=root)
    assert_split(test, *expected["test"])
    assert test.source == "cifar10 official (python pickle)"  # the official archive is preferred
    assert "mirror" in caplog.text and "cifar-10-python.tar.gz" in caplog.text

    (mirror / "cifar-10-python.tar.gz").unlink()  # now only the ImageFolder copy is there
    with caplog.at_level(logging.INFO, logger="harness.data"):
        assert load_split("cifar10", "test", root=tmp_path / "root2").source == \
            "cifar10 ImageFolder archive cifar10-jpeg.tar.gz"

    with pytest.raises(MissingArtifactError, match="has none of them"):
        load_split("cifar100", "test", root=root)


def test_fetch_from_loopback_server(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    folder, expected = make_cifar10(tmp_path / "src")
    body = tar_gz(folder, tmp_path / "cifar-10-python.tar.gz").read_bytes()
    md5 = hashlib.md5(body).hexdigest()
    root = tmp_path / "root"
    with serve({"/kriz/cifar-10-python.tar.gz": body}) as base:
        url = f"{base}/kriz/cifar-10-python.tar.gz"
        with pytest.raises(UsageError, match="checksum mismatch") as err:
            fetch_dataset("cifar10", root=root, url=url, progress=False)  # default: the official md5
        assert "c58f30108f718f92721af3b95e74349a" in str(err.value)
        with pytest.raises(UsageError, match="checksum mismatch"):
            fetch_dataset("cifar10", root=root, url=url, progress=False, sha256="0" * 64)
        assert not (root / "cifar10").exists() and leftovers(root) == []
        with pytest.raises(UsageError, match="could not download"):
            fetch_dataset("cifar10", root=root, url=f"{base}/missing.tar.gz", progress=False, md5=md5)
        assert leftovers(root) == []

        assert fetch_dataset("cifar10", root=root, url=url, progress=False, md5=md5) == root / "cifar10"
        assert_split(load_split("cifar10", "train", root=root), *expected["train"])
        meta = json.loads((root / "cifar10" / "meta.json").read_text())
        assert meta["url"] == url and meta["original"] == "cifar-10-python.tar.gz"
        assert meta["archive_sha256"] == hashlib.sha256(body).hexdigest()

        monkeypatch.setenv("HARNESS_DATA_URL_CIFAR10", url)  # URL from the environment
        fetch_dataset("cifar10", root=tmp_path / "root2", progress=False,
                      sha256=hashlib.sha256(body).hexdigest())
        assert load_split("cifar10", "test", root=tmp_path / "root2").source == \
            "cifar10 official (python pickle)"
    assert leftovers(root) == []


def test_parallel_decode_matches_serial(tmp_path, monkeypatch):
    from harness.data import imagefolder

    rng = np.random.default_rng(3)
    files = {}
    for i in range(5):
        write_png(tmp_path / f"{i}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        files[PurePosixPath(f"{i}.png")] = (tmp_path / f"{i}.png").read_bytes()
    names = list(files)

    def decode(names, files):
        blocks = list(imagefolder.decode_images(names, files, (3, 32, 32), progress=False))
        return np.concatenate(blocks), [len(b) for b in blocks]

    serial, sizes = decode(names, files)
    assert serial.shape == (5, 3, 32, 32) and sizes == [5]
    monkeypatch.setattr(imagefolder, "_POOL_MIN_IMAGES", 0)
    monkeypatch.setattr(imagefolder, "_CHUNK", 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    parallel, sizes = decode(names, files)
    np.testing.assert_array_equal(parallel, serial)
    assert sizes == [2, 2, 1]
    with pytest.raises(UsageError, match="cannot decode image bad.png"):
        decode(names + [PurePosixPath("bad.png")], {**files, PurePosixPath("bad.png"): b"not a png"})


def test_leftovers_of_a_killed_import_are_cleaned(tmp_path):
    folder, expected = make_cifar10(tmp_path / "src")
    root = tmp_path / "root"
    import_dataset("cifar10", folder, root=root, progress=False)
    os.replace(root / "cifar10", root / ".cifar10.old")  # killed between the two renames of a swap
    (root / ".cifar10.importing-x1").mkdir()
    (root / ".cifar10.download-x2").write_bytes(b"partial")
    (root / ".cifar100.importing-x3").mkdir()  # another dataset's: left alone
    with disk.locked(root, "cifar10"):
        pass
    assert sorted(leftovers(root)) == [".cifar100.importing-x3"]
    assert_split(load_split("cifar10", "test", root=root), *expected["test"])

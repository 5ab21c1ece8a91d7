"""ImageFolder imports beyond CIFAR-10: ImageNet (resize + centre crop, val/ as the test split) from the
shared sample photos, the CIFAR-100 and MNIST samples, class-name matching, block-wise streaming."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from harness.data import dataset_info, import_dataset, load_split, disk
from harness.data import imagefolder
from harness.data.catalog import DatasetInfo
from harness.data.formats import Decoded, DecodedSplit
from harness.data.imagenet_classes import WNIDS
from harness.core.errors import UsageError
from test_data import assert_split, leftovers, write_png

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared/data/samples"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path / "default-root"))
    monkeypatch.delenv("HARNESS_DATA_MIRROR", raising=False)


def samples(dataset: str) -> list[tuple[int, int, Path]]:
    """``(label, index, file)`` of the shared sample images ``{dataset}_{index}_{label}.*``."""
    files = sorted((SAMPLES / dataset).glob(f"{dataset}_*"))
    if not files:
        pytest.skip(f"no {dataset} samples in {SAMPLES}")
    return [(int(f.stem.split("_")[2]), int(f.stem.split("_")[1]), f) for f in files]


def sample_folder(root: Path, items: list[tuple[int, int, Path]], class_name, test_folder: str = "test") -> Path:
    """An ImageFolder with every sample in train/ and in ``test_folder``/, folders named ``class_name(label)``."""
    for label, index, file in items:
        for split in ("train", test_folder):
            target = root / split / class_name(label) / f"{index}{file.suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    return root


# --- ImageNet -------------------------------------------------------------------------------------

def test_imagenet_catalog():
    info = dataset_info("imagenet")
    assert (info.num_classes, info.image_shape, len(set(info.classes))) == (1000, (3, 224, 224), 1000)
    assert info.classes == WNIDS and list(WNIDS) == sorted(WNIDS)  # the standard order is sorted wnids
    assert (WNIDS[0], WNIDS[207], WNIDS[281], WNIDS[999]) == ("n01440764", "n02099601", "n02123045", "n15075141")


def _resized(file: Path) -> np.ndarray:
    """A 512x512 photo resized to 256x256 (bilinear) and cropped to its central 224x224, CHW."""
    with Image.open(file) as im:
        small = np.asarray(im.convert("RGB").resize((256, 256), Image.BILINEAR))
    return small[16:240, 16:240].transpose(2, 0, 1)


def test_imagenet_samples_import_resized_and_stable(tmp_path):
    items = samples("imagenet")
    src = sample_folder(tmp_path / "imagenet-tiny", items, lambda label: WNIDS[label], test_folder="val")
    root = tmp_path / "root"
    import_dataset("imagenet", src, root=root, progress=False)
    test = load_split("imagenet", "test", root=root)
    order = sorted(items, key=lambda e: e[:2])  # class by class, then by file name
    assert test.images.shape == (len(items), 3, 224, 224)
    assert test.labels.tolist() == [label for label, *_ in order]
    assert test.info.classes == WNIDS and test.source == "imagenet ImageFolder folder imagenet-tiny"
    for row, (_, _, file) in enumerate(order):
        with Image.open(file) as im:
            square = im.size == (512, 512)
        if square:
            np.testing.assert_array_equal(test.images[row].numpy(), _resized(file))
    meta = json.loads((root / "imagenet" / "meta.json").read_text())
    assert meta["preprocess"] == "shorter side resized to 256 (bilinear), centre crop 224x224"

    # the same images from a tar archive, and again from the folder: the same fingerprints
    archive = tmp_path / "imagenet-tiny.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="imagenet-tiny")
    import_dataset("imagenet", archive, root=tmp_path / "root2", progress=False)
    import_dataset("imagenet", src, root=root, progress=False)
    for split in ("train", "test"):
        assert load_split("imagenet", split, root=tmp_path / "root2").fingerprint == \
            load_split("imagenet", split, root=root).fingerprint
    assert load_split("imagenet", "train", root=root).fingerprint == test.fingerprint  # same images


def test_resize_crop_of_a_wide_image(tmp_path):
    """400x300 -> 341x256 (torchvision's int() of the long side) -> centre 224x224 from (58, 16)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    for split in ("train", "val"):
        write_png(tmp_path / "src" / split / WNIDS[5] / "0.png", pixels)
    import_dataset("imagenet", tmp_path / "src", root=tmp_path / "root", progress=False)
    stored = load_split("imagenet", "test", root=tmp_path / "root").images[0].numpy()
    resized = np.asarray(Image.fromarray(pixels).resize((341, 256), Image.BILINEAR))
    np.testing.assert_array_equal(stored, resized[16:240, 58:282].transpose(2, 0, 1))


def test_val_and_test_folders_together_are_ambiguous(tmp_path):
    for split in ("train", "val", "test"):
        write_png(tmp_path / "src" / split / "cat" / "0.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(UsageError, match="both test and val/ folders for the test split"):
        import_dataset("cifar10", tmp_path / "src", root=tmp_path / "root", progress=False)


# --- CIFAR-100 and MNIST samples, class names -----------------------------------------------------

@pytest.mark.parametrize("dataset, class_name, mode", [
    ("cifar100", lambda label: f"class_{label:02d}", "RGB"),
    ("mnist", str, "L"),
])
def test_exact_samples_import(tmp_path, dataset, class_name, mode):
    items = samples(dataset)
    src = sample_folder(tmp_path / "src", items, class_name)
    root = tmp_path / "root"
    import_dataset(dataset, src, root=root, progress=False)
    order = sorted(items, key=lambda e: e[:2])
    images = []
    for *_, file in order:
        with Image.open(file) as im:
            pixels = np.asarray(im.convert(mode))
        images.append(pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1))
    for split in ("train", "test"):
        loaded = load_split(dataset, split, root=root)
        assert_split(loaded, np.stack(images), np.array([label for label, *_ in order]))
        assert loaded.info.image_shape == dataset_info(dataset).image_shape
    first = load_split(dataset, "test", root=root).fingerprint
    import_dataset(dataset, src, root=root, progress=False)
    assert load_split(dataset, "test", root=root).fingerprint == first


def test_class_folders_match_names_ignoring_punctuation(tmp_path):
    gray = np.zeros((28, 28), np.uint8)
    for split in ("train", "test"):
        for folder in ("t-shirt_top", "Ankle boot", "ankle-boot"):
            write_png(tmp_path / "src" / split / folder / "0.png", gray)
    import_dataset("fashion-mnist", tmp_path / "src", root=tmp_path / "root", progress=False)
    test = load_split("fashion-mnist", "test", root=tmp_path / "root")
    assert test.labels.tolist() == [0, 9, 9] and test.info.classes[0] == "T-shirt/top"


# --- streaming ------------------------------------------------------------------------------------

def _two_class_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            for i in range(5):
                write_png(root / split / cls / f"{i}.png", rng.integers(0, 256, (32, 32, 3), np.uint8))
    return root


def test_blockwise_import_reads_lazily_and_matches_one_block(tmp_path, monkeypatch):
    src = _two_class_folder(tmp_path / "src")
    import_dataset("cifar10", src, root=tmp_path / "one", progress=False)
    monkeypatch.setattr(imagefolder, "_CHUNK", 3)
    reads = []
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real_read(self))
    seen = []  # (block size, files read so far) as the store consumes the blocks
    real_write = disk._write_split

    def spy(path, info, split, data):
        def blocks():
            for block in data.blocks:
                seen.append((len(block), len(reads)))
                yield block
        return real_write(path, info, split, DecodedSplit(data.labels, blocks()))

    monkeypatch.setattr(disk, "_write_split", spy)
    import_dataset("cifar10", src, root=tmp_path / "blocks", progress=False)
    assert seen == [(3, 3), (3, 6), (3, 9), (1, 10), (3, 13), (3, 16), (3, 19), (1, 20)]
    for split in ("train", "test"):
        assert load_split("cifar10", split, root=tmp_path / "blocks").fingerprint == \
            load_split("cifar10", split, root=tmp_path / "one").fingerprint


def test_block_size_is_capped_by_bytes(tmp_path, monkeypatch):
    files = {PurePosixPath(p.relative_to(tmp_path).as_posix()): p.read_bytes()
             for p in sorted(_two_class_folder(tmp_path / "src").rglob("*.png"))}
    monkeypatch.setattr(imagefolder, "_CHUNK_BYTES", 4 * 3 * 32 * 32)
    blocks = list(imagefolder.decode_images(list(files), files, (3, 32, 32), progress=False))
    assert [len(b) for b in blocks] == [4, 4, 4, 4, 4]
    # ImageNet-sized images come in blocks of at most _CHUNK_BYTES (32 MiB: 222 images), not 1,000
    assert (32 << 20) // (3 * 224 * 224) == 222 < imagefolder._CHUNK


def test_store_rejects_blocks_that_do_not_fit(tmp_path):
    info = DatasetInfo("cifar10", 10, (3, 32, 32), tuple(str(i) for i in range(10)))
    good = DecodedSplit.of(np.zeros((2, 3, 32, 32), np.uint8), np.array([0, 1]))
    for bad, message in (
        (DecodedSplit(np.array([0, 1]), [np.zeros((1, 3, 32, 32), np.uint8)] * 3), "after 2 of 2"),
        (DecodedSplit(np.array([0, 1, 2]), [np.zeros((2, 3, 32, 32), np.uint8)]), "3 labels but 2 images"),
        (DecodedSplit(np.array([0, 1]), [np.zeros((2, 3, 16, 16), np.uint8)]), r"\(2, 3, 16, 16\) \(uint8\)"),
        (DecodedSplit(np.array([], np.int64), []), "test has no images"),
    ):
        with pytest.raises(UsageError, match=message):
            disk.write_dataset(tmp_path, info, Decoded({"train": good, "test": bad}, info.classes, "x"), "s", {})
        assert leftovers(tmp_path) == [] and not (tmp_path / "cifar10").exists()

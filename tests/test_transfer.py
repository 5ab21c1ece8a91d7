"""Defense transfer: shape adapters, and purifiers trained on one dataset evaluated on another."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from harness.classifiers.sources import save_classifier
from harness.core.errors import UsageError
from harness.classifiers.architectures import build_classifier
from harness.core.noise import FixedNoise
from harness.core.entry import Defense, DefenseEntry, Identity, Kind, Purifier, registry_of
from harness.report.quality import transfer_table
from harness.report.frame import cells_frame
from harness.evaluation.runner import RunRequest, run_grid
from harness.results import Cell, open_db
from harness.toolkit.transfer import ShapeAdapter, match_channels, resize


def _noise():
    return FixedNoise(0).draws(range(4))


def test_grey_through_an_rgb_purifier_comes_back_unchanged():
    x = torch.rand(4, 1, 28, 28)
    adapter = ShapeAdapter(Identity(), (3, 28, 28), (1, 28, 28))
    assert torch.allclose(adapter(x, _noise()), x, atol=1e-6)


def test_rgb_to_grey_is_luma_and_grey_to_rgb_repeats():
    x = torch.rand(2, 3, 8, 8)
    grey = match_channels(x, 1)
    assert torch.allclose(grey[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    assert torch.equal(match_channels(grey, 3), grey.expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="only 1 <-> 3"):
        match_channels(torch.rand(1, 2, 4, 4), 3)


def test_resize_round_trip_is_close_and_identity_when_sizes_match():
    x = torch.rand(2, 3, 28, 28)
    assert resize(x, (28, 28)) is x
    smooth = resize(resize(x, (7, 7)), (28, 28))  # a smooth image survives 28 -> 32 -> 28 nearly intact
    assert (resize(resize(smooth, (32, 32)), (28, 28)) - smooth).abs().max() < 0.05


def test_adapter_shapes_and_gradients_and_inner_sees_its_own_shape():
    seen = []

    class Recorder(Purifier):
        def forward(self, x, noise):
            seen.append(tuple(x.shape))
            return x * 0.5 + 0.25

    adapter = ShapeAdapter(Recorder(), (3, 32, 32), (1, 28, 28))
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    out = adapter(x, _noise())
    assert out.shape == x.shape and seen == [(4, 3, 32, 32)]
    assert 0 <= out.min() and out.max() <= 1
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _write_imagefolder(root: Path, classes: int, shape: tuple[int, int, int], per_class: int) -> Path:
    rng = np.random.default_rng(1)
    c, h, w = shape
    for split in ("train", "test"):
        for k in range(classes):
            folder = root / split / f"class_{k:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.uniform(0, 255, size=(h, w, c)).astype(np.uint8)
                Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(folder / f"{i}.png")
    return root


class _MeanBlend(Purifier):
    """Pulls images toward the per-channel mean of the training split it was trained on."""

    def __init__(self, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1))

    def forward(self, x, noise):
        return 0.8 * x + 0.2 * self.mean


def _mean_blend_entry(trained_on: list[str]) -> DefenseEntry:
    def train(ctx):
        trained_on.append(ctx.train_split.info.name)
        return {"mean": ctx.train_split.float_images().mean(dim=(0, 2, 3))}

    def build(ctx):
        return Defense(ctx.classifier, _MeanBlend(ctx.weights()["mean"]))

    return DefenseEntry(name="meanblend", version="1", kind=Kind.PURIFIER, paper="p", citation="c",
                        build=build, train=train, presets={"small": {}})


def test_purifier_trained_on_another_dataset_is_a_cell_of_its_own(tiny_cifar, tmp_path):
    """A purifier trained on (synthetic) RGB 32x32 CIFAR-10 in front of a grey 28x28 MNIST classifier."""
    from harness.data import import_dataset

    digits = _write_imagefolder(tmp_path / "mnist", 10, (1, 28, 28), 2)
    for k in range(10):  # MNIST's class names are the digits
        for split in ("train", "test"):
            (digits / split / f"class_{k:03d}").rename(digits / split / str(k))
    import_dataset("mnist", digits, progress=False)
    torch.manual_seed(0)
    clf10 = save_classifier(build_classifier("convnet-tiny", 10), "convnet-tiny", 10, tmp_path / "c10.safetensors")
    grey = save_classifier(build_classifier("convnet-tiny", 10, (1, 28, 28)), "convnet-tiny", 10,
                           tmp_path / "grey.safetensors")
    trained_on: list[str] = []
    registry = registry_of(
        _mean_blend_entry(trained_on))
    engine = open_db(str(tmp_path / "r.db"))
    request = RunRequest(defenses=("meanblend",), dataset="mnist", classifier=str(grey),
                         train_classifier=str(clf10), train_datasets=(None, "cifar10"), protocols=("adaptive",),
                         n=8, batch_size=4, attacks=({"name": "pgd", "steps": 2},), progress=False)
    outcomes = run_grid(request, engine, registry)

    assert [o.train_dataset for o in outcomes] == [None, "cifar10"]
    assert sorted(trained_on) == ["cifar10", "mnist"]
    with Session(engine) as s:
        cells = list(s.scalars(select(Cell)))
    assert len({c.key for c in cells}) == 2 and {c.dataset for c in cells} == {"mnist"}
    transferred = [c for c in cells if c.config["defense"].get("train_dataset") == "cifar10"]
    assert len(transferred) == 1
    assert transferred[0].config["defense"]["train_classifier"] != transferred[0].classifier
    assert transferred[0].config["defense_provenance"]["adapter"]["inner_shape"] == [3, 32, 32]
    assert 10 < transferred[0].metrics["psnr_clean"] < 100  # purified images are grey 28x28 again
    from harness.report.frame import aggregate_seeds, done_cells

    reported = [{"dataset": "mnist", "threat": "linf", "eps": "8/255", "attack": "PGD", "clean": 99.0,
                 "robust": 90.0, "source": "paper", "tier": "adaptive"}]
    rows = aggregate_seeds(done_cells(cells_frame(engine)), {("meanblend", "1"): reported})
    in_domain = "train_dataset" not in rows["defense_options"].iloc[0]
    assert [r is not None for r in rows["reported"]] == ([True, False] if in_domain else [False, True])
    table = transfer_table(cells_frame(engine))
    assert sorted(table["train_dataset"]) == ["cifar10", "mnist"]
    assert set(table["dataset"]) == {"mnist"}

    # the same request again stores nothing new and trains nothing
    again = run_grid(request, engine, registry)
    assert {o.status for o in again} == {"skipped"} and len(trained_on) == 2


def test_transfer_of_a_classifier_entry_or_unknown_dataset_is_refused(tiny_cifar, tmp_path):
    registry = registry_of(
        DefenseEntry(name="robust", version="1", kind=Kind.CLASSIFIER, paper="p",
                     citation="c", build=lambda ctx: Defense(ctx.classifier)),
        _mean_blend_entry([]))
    engine = open_db(str(tmp_path / "r.db"))
    base = dict(classifier="trained:tiny", n=4, progress=False, allow_train=False)
    with pytest.raises(UsageError, match="not a purifier"):
        run_grid(RunRequest(defenses=("robust",), train_datasets=("cifar100",), **base), engine, registry)
    with pytest.raises(UsageError, match="unknown dataset .svhn.*cifar10"):
        run_grid(RunRequest(defenses=("meanblend",), train_datasets=("svhn",), **base), engine, registry)
    with Session(engine) as s:
        assert s.scalars(select(Cell)).first() is None

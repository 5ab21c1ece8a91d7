"""Classifier training on 1-channel 28x28 data: per-dataset statistics and flips, and the ``tiny`` preset
on the real Fashion-MNIST (skipped where the Debian package dataset-fashion-mnist is not installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.data import dataset_info, import_dataset, load_split
from harness.core.errors import UsageError
from harness.classifiers.architectures import build_classifier
from harness.classifiers.training import CLASSIFIER_PRESETS, augment_batch, train_classifier

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
FAST = {**CLASSIFIER_PRESETS["tiny"], "epochs": 1, "batch_size": 16}


def test_augment_without_flip_only_crops():
    x = torch.rand(16, 1, 8, 8)
    y = augment_batch(x, torch.Generator().manual_seed(0), 2, flip=False)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(16):
        assert any(torch.equal(y[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))
    assert not torch.equal(augment_batch(x, torch.Generator().manual_seed(0), 0, flip=True), x)


def test_dataset_statistics_and_flips(monkeypatch):
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(32) % 10
    flips = []
    import harness.classifiers.training as recipe

    real_augment = recipe.augment_batch
    monkeypatch.setattr(recipe, "augment_batch",
                        lambda x, g, pad, flip: flips.append(flip) or real_augment(x, g, pad, flip))
    for name, mean, std, flip in (("mnist", 0.1307, 0.3081, False), ("fashion-mnist", 0.2860, 0.3530, True)):
        flips.clear()
        model, _ = train_classifier(images, labels, 10, FAST, progress=False, dataset=dataset_info(name))
        state = model.state_dict()
        assert state["normalize.mean"].flatten().tolist() == pytest.approx([mean])
        assert state["normalize.std"].flatten().tolist() == pytest.approx([std])
        assert set(flips) == {flip}
    # without a dataset: the 1-channel default statistics (Fashion-MNIST's)
    default = build_classifier("convnet-tiny", 10, (1, 28, 28)).state_dict()
    assert default["normalize.mean"].flatten().tolist() == pytest.approx([0.2860])
    with pytest.raises(UsageError, match=r"images of shape \(1, 28, 28\) are not cifar10 images \(3, 32, 32\)"):
        train_classifier(images, labels, 10, FAST, progress=False, dataset=dataset_info("cifar10"))


@pytest.mark.slow
@pytest.mark.skipif(not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not installed in {DEBIAN_FASHION} "
                           f"(apt-get install dataset-fashion-mnist)")
def test_tiny_preset_on_real_fashion_mnist(tmp_path):
    """2,000 training images, 8 epochs: about 81% on the first 2,000 test images, in ~10 s on one thread."""
    import_dataset("fashion-mnist", DEBIAN_FASHION, root=tmp_path, progress=False)
    train, test = (load_split("fashion-mnist", s, root=tmp_path) for s in ("train", "test"))
    model, metrics = train_classifier(train.images, train.labels, 10, CLASSIFIER_PRESETS["tiny"], seed=0,
                                      progress=False, eval_images=test.images[:2000],
                                      eval_labels=test.labels[:2000], dataset=train.info)
    assert metrics["eval_accuracy"] > 0.7, metrics  # chance: 0.1
    assert model(test.float_images(torch.arange(4))).shape == (4, 10)

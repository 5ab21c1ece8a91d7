"""Classifier architectures (harness.classifiers.architectures) and the training recipe (harness.classifiers.training)."""

from __future__ import annotations

import pytest
import torch

from harness.core.errors import UsageError
from harness.classifiers.architectures import architecture_registry, build_classifier, count_parameters

ARCHITECTURES = architecture_registry().names()
from harness.classifiers.training import CLASSIFIER_PRESETS, augment_batch, evaluate_accuracy, train_classifier

SMALL_ARCHS = [a for a in ARCHITECTURES if a != "wrn-28-10"]


def blobs(n: int, num_classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable synthetic set: a class-coloured 10x10 blob at a random place on a noisy background."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30],
                            [230, 30, 230], [30, 230, 230]], dtype=torch.float32)[:num_classes]
    labels = torch.arange(n) % num_classes
    images = 110 + 40 * torch.rand(n, 3, 32, 32, generator=g)
    ys = torch.randint(0, 22, (n,), generator=g)
    xs = torch.randint(0, 22, (n,), generator=g)
    for i in range(n):
        images[i, :, ys[i] : ys[i] + 10, xs[i] : xs[i] + 10] = palette[labels[i]].view(3, 1, 1)
    return images.round().clamp(0, 255).to(torch.uint8), labels


FAST = {**CLASSIFIER_PRESETS["tiny"], "epochs": 2, "batch_size": 32}


@pytest.mark.parametrize("arch", SMALL_ARCHS)
def test_architectures_give_logits_and_input_gradients(arch):
    torch.manual_seed(0)
    model = build_classifier(arch, 10).eval()
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, 10) and logits.dtype == torch.float32
    logits.logsumexp(1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():  # eval mode is deterministic
        assert torch.equal(model(x), model(x))
    state = model.state_dict()
    assert any(k.endswith("normalize.mean") for k in state) and any(k.endswith("normalize.std") for k in state)


def test_wrn_28_10_shape():
    model = build_classifier("wrn-28-10", 10).eval()
    assert 36_000_000 < count_parameters(model) < 37_000_000
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_other_shapes_and_classes():
    for arch in SMALL_ARCHS:
        assert build_classifier(arch, 100).eval()(torch.rand(2, 3, 32, 32)).shape == (2, 100)
        gray = build_classifier(arch, 10, (1, 28, 28)).eval()
        assert gray(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_normalisation_inside_model():
    model = build_classifier("convnet-tiny", 10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    assert torch.allclose(model.normalize(torch.full((1, 3, 2, 2), 0.75)), torch.ones(1, 3, 2, 2))
    assert count_parameters(build_classifier("convnet-small", 10)) < 400_000


def test_unknown_architecture_lists_valid_ones():
    with pytest.raises(UsageError) as info:
        build_classifier("vgg99", 10)
    for arch in ARCHITECTURES:
        assert arch in str(info.value)
    with pytest.raises(UsageError):
        train_classifier(*blobs(8), 4, {**FAST, "no_such_key": 1}, progress=False)


def test_presets():
    assert {"tiny", "small", "paper"} <= set(CLASSIFIER_PRESETS)
    paper = CLASSIFIER_PRESETS["paper"]
    assert (paper["arch"], paper["epochs"], paper["batch_size"], paper["lr"], paper["momentum"],
            paper["weight_decay"]) == ("wrn-28-10", 200, 128, 0.1, 0.9, 5e-4)
    for preset in CLASSIFIER_PRESETS.values():
        assert preset["arch"] in ARCHITECTURES


def test_augment_is_flip_plus_crop():
    x = torch.rand(16, 3, 8, 8)
    y = augment_batch(x, torch.Generator().manual_seed(0), 2)
    padded = torch.nn.functional.pad(torch.cat([x, x.flip(-1)]), (2, 2, 2, 2), mode="reflect")
    for i in range(16):
        crops = [padded[j, :, dy : dy + 8, dx : dx + 8] for j in (i, i + 16) for dy in range(5) for dx in range(5)]
        assert any(torch.equal(y[i], c) for c in crops)


def test_tiny_preset_learns_blobs():
    images, labels = blobs(320, seed=1)
    test_images, test_labels = blobs(200, seed=2)
    model, metrics = train_classifier(images, labels, 4, CLASSIFIER_PRESETS["tiny"], seed=0, progress=False,
                                      eval_images=test_images, eval_labels=test_labels)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert metrics["eval_accuracy"] >= 0.9, metrics
    assert metrics["eval_accuracy"] == evaluate_accuracy(model, test_images, test_labels)
    for key in ("train_loss", "seconds", "epochs", "params"):
        assert key in metrics
    # the trained weights load into a freshly built model of the same architecture
    fresh = build_classifier(CLASSIFIER_PRESETS["tiny"]["arch"], 4)
    fresh.load_state_dict(model.state_dict())


def test_same_seed_same_weights_and_global_rng_untouched():
    images, labels = blobs(160)
    before = torch.random.get_rng_state()
    a, _ = train_classifier(images, labels, 4, FAST, seed=3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)
    b, _ = train_classifier(images, labels, 4, FAST, seed=3, progress=False)
    c, _ = train_classifier(images, labels, 4, FAST, seed=4, progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_bf16_and_plain_paths_run():
    images, labels = blobs(64)
    cfg = {**FAST, "epochs": 1, "bf16": True, "channels_last": False, "whiten_stem": False, "augment": False}
    model, metrics = train_classifier(images, labels, 4, cfg, seed=0, progress=False)
    assert next(model.parameters()).dtype == torch.float32 and metrics["steps"] == 2

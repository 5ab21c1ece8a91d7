"""Frozen diffusion features (harness.toolkit.diffusion.features): shapes per block, pinned noise,
exact gradients, and the feature cache."""

from __future__ import annotations

import json

import pytest
import torch

from harness.core.artifacts import ArtifactCache
from harness.core.errors import UsageError
from harness.toolkit.diffusion.features import (DiffusionFeatures, cached_features, feature_blocks,
                                                load_feature_ddpm, pinned_noise)
from harness.toolkit.diffusion.model import build_unet, ddpm_preset, make_scheduler


@pytest.fixture(scope="module")
def tiny_unet():
    config = ddpm_preset("tiny")
    unet = build_unet(config["unet"], (3, 32, 32), seed=0)
    return unet, make_scheduler(config["schedule"]).alphas_cumprod


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("block,dim", [("mid", 16), ("down.0", 8), ("down.1", 16), ("up.0", 16), ("up.1", 8)])
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_shape_and_dim_per_block(tiny_unet, block, dim, pool):
    unet, alphas = tiny_unet
    feats = DiffusionFeatures(unet, alphas, 10, block, pool)
    x = _x(3)
    out = feats(x, pinned_noise(torch.arange(3), (3, 32, 32), 0))
    assert feats.dim == dim and out.shape == (3, dim)
    assert torch.isfinite(out).all()


def test_early_exit_matches_the_full_forward(tiny_unet):
    """The captured mid-block output equals the one a full, uninterrupted forward pass produces."""
    unet, alphas = tiny_unet
    feats = DiffusionFeatures(unet, alphas, 20, "mid", "avg")
    x, noise = _x(2), pinned_noise(torch.arange(2), (3, 32, 32), 0)
    seen = []
    handle = unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o.mean(dim=(2, 3))))
    try:
        unet(feats.noised(x, noise), torch.full((2,), 20))
    finally:
        handle.remove()
    assert torch.allclose(feats(x, noise), seen[0], atol=1e-6)
    assert not unet.mid_block._forward_hooks  # the capture hook is removed after each call


def test_pinned_noise_is_per_image():
    a = pinned_noise(torch.tensor([3, 7, 11]), (3, 4, 4), seed=0)
    b = pinned_noise(torch.tensor([11, 5, 3]), (3, 4, 4), seed=0)
    assert a.shape == (3, 3, 4, 4)
    assert torch.equal(a[0], b[2]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[1], b[1])
    assert not torch.equal(a, pinned_noise(torch.tensor([3, 7, 11]), (3, 4, 4), seed=1))


def test_same_index_same_features_in_different_batches(tiny_unet):
    unet, alphas = tiny_unet
    feats = DiffusionFeatures(unet, alphas, 30, "mid")
    images = _x(6)
    first = torch.tensor([0, 1, 2, 3])
    second = torch.tensor([5, 2, 4])
    f1 = feats(images[first], pinned_noise(first, (3, 32, 32), 0))
    f2 = feats(images[second], pinned_noise(second, (3, 32, 32), 0))
    assert torch.allclose(f1[2], f2[1], atol=1e-5)
    assert not torch.allclose(f1[0], f1[1], atol=1e-3)


def test_gradients_wrt_x_are_nonzero_and_unet_frozen(tiny_unet):
    unet, alphas = tiny_unet
    feats = DiffusionFeatures(unet, alphas, 10, "down.1")
    x = _x(2).requires_grad_(True)
    feats(x, pinned_noise(torch.arange(2), (3, 32, 32), 0)).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in feats.parameters())
    assert not feats.train().training


def test_bad_block_pool_timestep(tiny_unet):
    unet, alphas = tiny_unet
    with pytest.raises(UsageError, match="valid: down.0, down.1, mid, up.0, up.1"):
        DiffusionFeatures(unet, alphas, 10, "middle")
    with pytest.raises(UsageError, match="valid: avg, max"):
        DiffusionFeatures(unet, alphas, 10, "mid", "sum")
    with pytest.raises(UsageError, match="outside"):
        DiffusionFeatures(unet, alphas, len(alphas), "mid")
    assert feature_blocks(unet) == ["down.0", "down.1", "mid", "up.0", "up.1"]


def test_cache_round_trip_and_keys(tiny_cifar):
    from harness.data import load_split

    split = load_split("cifar10", "train")
    cache = ArtifactCache()
    a = cached_features(cache, split, preset="tiny", timestep=10, block="mid", pool="avg", batch_size=32,
                        progress=False)
    assert a.dtype == torch.float32 and a.shape == (len(split.labels), 16)
    kinds = sorted(p.name for p in (cache.root / "diffusion-features").iterdir() if not p.name.startswith("."))
    assert len(kinds) == 1
    b = cached_features(cache, split, preset="tiny", timestep=10, block="mid", pool="avg", batch_size=7,
                        progress=False)
    assert torch.equal(a, b)  # read back from the cache, not recomputed with another batching
    c = cached_features(cache, split, preset="tiny", timestep=50, block="mid", pool="avg", progress=False)
    keys = sorted(p.name for p in (cache.root / "diffusion-features").iterdir() if not p.name.startswith("."))
    assert len(keys) == 2 and not torch.equal(a, c)
    # the features are those of the model on the clean images with pinned noise
    loaded, ddpm = load_feature_ddpm(cache, split, "tiny")
    model = DiffusionFeatures(loaded.unet, loaded.scheduler.alphas_cumprod, 10, "mid")
    idx = torch.tensor([4, 9])
    with torch.no_grad():
        direct = model(split.float_images(idx), pinned_noise(idx, (3, 32, 32), 0))
    assert torch.allclose(direct, a[idx], atol=1e-5)
    recipe = json.loads((cache.root / "diffusion-features" / keys[0] / "recipe.json").read_text())
    assert recipe["ddpm"] == ddpm.key and recipe["fingerprint"] == split.fingerprint


def test_subset_features(tiny_cifar):
    from harness.data import load_split

    split = load_split("cifar10", "train")
    cache = ArtifactCache()
    idx = torch.tensor([30, 2, 17])
    sub = cached_features(cache, split, preset="tiny", timestep=10, block="down.1", pool="max", indices=idx,
                          progress=False)
    whole = cached_features(cache, split, preset="tiny", timestep=10, block="down.1", pool="max", progress=False)
    assert sub.shape == (3, 16) and torch.allclose(sub, whole[idx], atol=1e-5)
    assert torch.equal(cached_features(cache, split, preset="tiny", timestep=10, block="down.1", pool="max",
                                       indices=idx, progress=False), whole[idx])  # read from the whole split


def test_features_of_another_split_use_the_training_splits_ddpm(tiny_cifar):
    """The features of a synthetic (or test) split come from the DDPM trained on the real training split."""
    from harness.data import Split, load_split

    train = load_split("cifar10", "train")
    cache = ArtifactCache()
    cached_features(cache, train, preset="tiny", timestep=10, block="mid", pool="avg", progress=False)
    other = Split(train.info, "synthetic", train.images[:5].flip(-1).contiguous(), train.labels[:5], "0123456789abcdef",
                  "synthetic set 0123456789abcdef")
    feats = cached_features(cache, other, preset="tiny", timestep=10, block="mid", pool="avg", progress=False)
    assert feats.shape == (5, 16)
    assert len([p for p in (cache.root / "ddpm").iterdir() if not p.name.startswith(".")]) == 1
    recipes = [json.loads((p / "recipe.json").read_text()) for p in (cache.root / "diffusion-features").iterdir()
               if not p.name.startswith(".")]
    assert len({r["ddpm"] for r in recipes}) == 1 and {r["split"] for r in recipes} == {"train", "synthetic"}

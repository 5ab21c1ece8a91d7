"""The ``maep`` entry, its training pairs and the shared purifier training loop, at toy sizes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from defenses.maep import MAEP, MAEPurifier, maep_loss, new_purifier
from harness.core.context import BuildContext, TrainContext
from harness.data import DatasetInfo, Split
from harness.core.noise import FixedNoise, NoiseDraws
from harness.core.keys import module_fingerprint
from harness.toolkit.pairs import adversarial_pairs, pairs_recipe
from harness.toolkit.purifier_training import train_purifier

EPS = 8 / 255
INFO = DatasetInfo("cifar10", 10, (3, 32, 32), tuple(f"c{i}" for i in range(10)))
TINY = {
    "pairs": {"n": 200, "eps": "8/255", "steps": 2, "step_size": "2/255", "batch_size": 64},
    "model": {"patch_size": 2, "dim": 32, "depth": 1, "heads": 2, "decoder_dim": 32, "decoder_depth": 1,
              "decoder_heads": 2, "mlp_ratio": 2.0},
    "train": {"mask_ratio": 0.5, "clean_fraction": 0.2, "epochs": 1, "batch_size": 50, "lr": 1e-3,
              "weight_decay": 0.05},
}


class _NoDraws(NoiseDraws):
    """Fails if a purifier asks for randomness."""

    def randn(self, shape, *, device="cpu", dtype=torch.float32):
        raise AssertionError("a deterministic purifier drew noise")

    rand = randn


@pytest.fixture(scope="module")
def split() -> Split:
    gen = torch.Generator().manual_seed(0)
    smooth = torch.rand(256, 3, 8, 8, generator=gen)
    images = nn.functional.interpolate(smooth, size=32, mode="bilinear", align_corners=False)
    return Split(info=INFO, split="train", images=(images * 255).round().to(torch.uint8),
                 labels=torch.randint(0, 10, (256,), generator=gen), fingerprint="toy", source="synthetic")


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()


@pytest.fixture(scope="module")
def trained(split, classifier) -> dict[str, torch.Tensor]:
    return MAEP.train(TrainContext(entry_name="maep", config=TINY, train_split=split, classifier=classifier,
                                   seed=0, progress=False))


@pytest.fixture(scope="module")
def defense(trained, classifier):
    ctx = BuildContext(entry_name="maep", dataset=INFO, classifier=classifier, preset=None, config=TINY,
                       options={}, weights=lambda: trained)
    return MAEP.build(ctx).eval()


def _purifier(seed: int = 0) -> MAEPurifier:
    return new_purifier(TINY["model"], (3, 32, 32), seed=seed)


def test_entry_metadata():
    assert MAEP.name == "maep" and MAEP.kind.value == "purifier"
    assert not MAEP.stochastic and MAEP.differentiable
    assert {"small", "paper"} <= set(MAEP.presets)
    for preset in MAEP.presets.values():
        assert 0 < preset["train"]["mask_ratio"] < 1 and preset["model"]["patch_size"] == 2
    assert {(r.dataset, r.clean, r.robust) for r in MAEP.reported} == {("cifar10", 92.30, 88.73),
                                                                      ("cifar100", 73.67, 76.22)}


def test_train_is_seeded_and_leaves_global_rng_alone(split, classifier, trained):
    state = torch.random.get_rng_state()
    again = MAEP.train(TrainContext(entry_name="maep", config=TINY, train_split=split, classifier=classifier,
                                    seed=0, progress=False))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert trained.keys() == again.keys()
    assert all(torch.equal(trained[k], again[k]) for k in trained)
    assert not any(torch.equal(v, _purifier().state_dict()[k]) for k, v in trained.items() if v.dim() >= 2)


def test_build_output_shape_range_and_logits(defense, split):
    x = split.float_images(torch.arange(8))
    noise = FixedNoise(0).draws(torch.arange(8))
    purified = defense.purify(x, noise)
    assert purified.shape == x.shape and purified.dtype == torch.float32
    assert purified.min() >= 0 and purified.max() <= 1
    assert defense(x, noise).shape == (8, 10)


def test_inference_is_deterministic_and_batch_independent(defense, split):
    x = split.float_images(torch.arange(16))
    first, second = defense.purify(x, _NoDraws()), defense.purify(x, _NoDraws())
    assert torch.equal(first, second)
    alone = torch.cat([defense.purify(x[i:i + 1], _NoDraws()) for i in (3, 9)])
    torch.testing.assert_close(alone, first[[3, 9]], rtol=0, atol=1e-6)


def test_inference_uses_mask_ratio_zero(defense, split):
    purifier = defense.purifier
    assert purifier.inference_mask_ratio == 0.0
    x = split.float_images(torch.arange(4))
    assert torch.equal(purifier(x, _NoDraws()), purifier.reconstruct(x, 0.0))
    masked = purifier.reconstruct(x, 0.5, torch.Generator().manual_seed(1))
    assert not torch.allclose(masked, purifier(x, _NoDraws()))
    with pytest.raises(ValueError):
        purifier.reconstruct(x, 0.5)  # masking never falls back on the global RNG


def test_encoder_sees_only_visible_patches():
    model, seen = _purifier(), []
    model.encoder.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape[1]))
    x = torch.rand(2, 3, 32, 32)
    model.reconstruct(x, 0.5, torch.Generator().manual_seed(0))
    model.reconstruct(x, 0.0)
    assert seen == [128, 256]  # 16x16 patches of 2x2 pixels, half of them masked


def test_loss_is_l1_over_all_pixels():
    model = _purifier()
    x_adv, x = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    unmasked = maep_loss(0.0)(model, x_adv, x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(unmasked, (model(x_adv) - x).abs().mean())
    gen, replay = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    masked = maep_loss(0.5)(model, x_adv, x, gen)
    torch.testing.assert_close(masked, (model.reconstruct(x_adv, 0.5, replay) - x).abs().sum() / x.numel())


def test_adversarial_pairs_within_eps_and_seeded(classifier, split):
    state = torch.random.get_rng_state()
    kwargs = dict(n=40, eps="8/255", steps=3, step_size="2/255", progress=False)
    x_adv, x = adversarial_pairs(classifier, split, batch_size=16, seed=3, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert x_adv.shape == x.shape == (40, 3, 32, 32) and x_adv.dtype == torch.float32
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and (x_adv - x).abs().max() > EPS / 2
    all_images = split.float_images()
    assert all(any(torch.equal(img, ref) for ref in all_images) for img in x[:5])
    same_adv, same_x = adversarial_pairs(classifier, split, batch_size=40, seed=3, **kwargs)
    assert torch.equal(same_adv, x_adv) and torch.equal(same_x, x)  # batch size does not matter
    other_adv, other_x = adversarial_pairs(classifier, split, batch_size=16, seed=4, **kwargs)
    assert not torch.equal(other_x, x)
    with pytest.raises(ValueError):
        adversarial_pairs(classifier, split, batch_size=16, seed=3, **{**kwargs, "n": 10_000})


def test_pairs_recipe_names_what_determines_the_pairs(classifier, split):
    settings = dict(TINY["pairs"], n=40)
    recipe = pairs_recipe(classifier, split, seed=0, **settings)
    assert recipe == pairs_recipe(copy.deepcopy(classifier), split, seed=0, **dict(settings, eps=EPS))
    assert recipe["train_fingerprint"] == "toy" and recipe["attack"]["step_size"] == 2 / 255
    changed = copy.deepcopy(classifier)
    with torch.no_grad():
        changed[1].bias[0] += 1e-3
    others = [pairs_recipe(changed, split, seed=0, **settings), pairs_recipe(classifier, split, seed=1, **settings),
              pairs_recipe(classifier, split, seed=0, **dict(settings, n=41)),
              pairs_recipe(classifier, split, seed=0, **dict(settings, steps=3))]
    assert all(other != recipe for other in others)


def test_module_fingerprint_sees_architecture_and_buffers():
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    strided = copy.deepcopy(base)
    strided[0].stride = (2, 2)
    moved = copy.deepcopy(base)
    moved[1].running_mean += 1
    prints = {module_fingerprint(m) for m in (base, strided, moved)}
    assert len(prints) == 3 and module_fingerprint(copy.deepcopy(base)) == module_fingerprint(base)


def test_gradients_reach_the_input(defense, split):
    x = split.float_images(torch.arange(4)).requires_grad_(True)
    loss = nn.functional.cross_entropy(defense(x, _NoDraws()), split.labels[:4])
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_train_purifier_learns_and_leaves_global_rng_alone():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=gen)
    x_adv = (x + EPS * torch.randn(x.shape, generator=gen).sign()).clamp(0, 1)
    model = _purifier()
    before = maep_loss(0.0)(model, x_adv, x, gen).item()
    state = torch.random.get_rng_state()
    metrics = train_purifier(model, x_adv, x, maep_loss(0.5), epochs=3, batch_size=16, lr=3e-3,
                             weight_decay=0.0, seed=0, progress=False, clean_fraction=0.25)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not model.training and metrics["steps"] == 12
    assert maep_loss(0.0)(model, x_adv, x, gen).item() < before
    clone = copy.deepcopy(model)
    with pytest.raises(ValueError):
        train_purifier(clone, x_adv, x[:10], maep_loss(0.5), epochs=1, batch_size=8, lr=1e-3,
                       weight_decay=0.0, seed=0, progress=False)

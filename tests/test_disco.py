"""DISCO: the LIIF purifier trains on shared PGD pairs, builds, and is a deterministic differentiable map."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from defenses.disco import DISCO, LIIF, disco_loss, new_purifier
from harness.core.context import BuildContext, TrainContext
from harness.data import DatasetInfo, Split
from harness.data.disk import fingerprint
from harness.core.noise import FixedNoise
from harness.core.entry import Defense

TINY = {
    "pairs": {"n": 24, "eps": "8/255", "steps": 2, "step_size": "2/255", "batch_size": 12},
    "model": {"feats": 8, "blocks": 1, "hidden": [16], "local_ensemble": True},
    "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.0, "clean_fraction": 0.0},
}


def _split(n: int = 32) -> Split:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    info = DatasetInfo("cifar10", 10, (3, 16, 16), tuple(str(i) for i in range(10)))
    return Split(info, "train", images, labels, fingerprint(images.numpy(), labels.numpy()), "synthetic")


def _classifier() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)).eval()


@pytest.fixture(scope="module")
def trained() -> tuple[dict[str, torch.Tensor], Defense]:
    split, classifier = _split(), _classifier()
    ctx = TrainContext(entry_name="disco", config=TINY, train_split=split, classifier=classifier,
                       progress=False)
    weights = DISCO.train(ctx)
    build_ctx = BuildContext(entry_name="disco", dataset=split.info, classifier=classifier, preset=None,
                             config=TINY, options={}, weights=lambda: weights)
    return weights, DISCO.build(build_ctx).eval()


def test_tiny_config_trains_and_builds(trained):
    weights, defense = trained
    assert isinstance(defense, Defense) and all(torch.isfinite(w).all() for w in weights.values())
    assert set(weights) == set(defense.purifier.state_dict())
    x = _split().float_images()[:4]
    out = defense.purify(x, FixedNoise(0).draws(range(4)))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert defense(x, FixedNoise(0).draws(range(4))).shape == (4, 10)


def test_training_is_deterministic(trained):
    split, classifier = _split(), _classifier()
    again = DISCO.train(TrainContext(entry_name="disco", config=TINY, train_split=split,
                                     classifier=classifier, progress=False))
    assert all(torch.equal(again[k], v) for k, v in trained[0].items())


def test_purifier_is_deterministic_and_differentiable(trained):
    purifier = trained[1].purifier
    x = _split().float_images()[:3].requires_grad_(True)
    out = purifier(x)
    assert torch.equal(out, purifier(x.detach()))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_loss_gradients_reach_every_parameter():
    model = new_purifier(TINY["model"], (3, 16, 16), seed=0)
    x = torch.rand(2, 3, 16, 16)
    disco_loss(model, x, x, torch.Generator()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_local_ensemble_at_scale_one_matches_own_code_inside():
    """At the input resolution the ensemble reduces to each pixel's own code, except the last row/column."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = LIIF(3, feats=8, blocks=1, hidden=(16,), local_ensemble=True)
    plain = LIIF(3, feats=8, blocks=1, hidden=(16,), local_ensemble=False)
    plain.load_state_dict(net.state_dict())
    x = torch.rand(2, 3, 12, 10)
    with torch.no_grad():
        a, b = net(x), plain(x)
    assert a.shape == x.shape
    assert torch.allclose(a[..., :-1, :-1], b[..., :-1, :-1], atol=1e-5)


# --- MAEP loss ablation (Table 10), built on MAEP's model and the same training machinery ---------

MAEP_TINY = {
    "pairs": {"n": 16, "eps": "8/255", "steps": 1, "step_size": "2/255", "batch_size": 16},
    "model": {"patch_size": 4, "dim": 16, "depth": 1, "heads": 2, "decoder_dim": 16, "decoder_depth": 1,
              "decoder_heads": 2, "mlp_ratio": 1.0},
}


@pytest.mark.parametrize("name,extra", [
    ("maep-mlm", {"mask_ratio": 0.5, "finetune_epochs": 1}),
    ("maep-both", {"mask_ratio": 0.5}),
    ("maep-trades-pixel", {"mask_ratio": 0.5, "beta": 1.0}),
])
def test_ablation_entries_train_and_build(name, extra):
    from harness.core.entry import defense_registry

    entry = defense_registry().get(name)
    assert set(entry.presets) == {"small", "paper"} and "Table 10" in entry.citation
    config = dict(MAEP_TINY, train=dict(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, **extra))
    split, classifier = _split(), _classifier()
    weights = entry.train(TrainContext(entry_name=name, config=config, train_split=split,
                                       classifier=classifier, progress=False))
    defense = entry.build(BuildContext(entry_name=name, dataset=split.info, classifier=classifier,
                                       preset=None, config=config, options={}, weights=lambda: weights))
    x = split.float_images()[:2]
    out = defense.purify(x, FixedNoise(0).draws(range(2)))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1


def test_mlm_mask_replays_maep_mask():
    """The MLM loss rebuilds MAEP's patch mask: pixels it calls masked do not reach the output."""
    from defenses.maep import new_purifier as new_maep
    from defenses.maep_ablation import _patch_mask

    model = new_maep(MAEP_TINY["model"], (3, 16, 16), seed=0).eval()
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = model.reconstruct(x, 0.5, gen)
        mask = _patch_mask(model, 2, 0.5, state)
        assert mask.mean().item() == pytest.approx(0.5)
        same = model.reconstruct(x + mask * 0.3, 0.5, torch.Generator().set_state(state))
        moved = model.reconstruct(x + (1 - mask) * 0.3, 0.5, torch.Generator().set_state(state))
    assert torch.allclose(out, same, atol=1e-6) and not torch.allclose(out, moved, atol=1e-3)


# --- PGD pairs: one cached artifact shared by every recipe with the same pair settings -----------

def test_entries_with_the_same_pairs_compute_them_once(tmp_path, monkeypatch):
    import harness.toolkit.pairs as pairs_module
    from harness.core.artifacts import ArtifactCache
    from harness.core.entry import defense_registry
    from harness.toolkit.pairs import adversarial_pairs, training_pairs

    calls = []
    generate = pairs_module._generate
    monkeypatch.setattr(pairs_module, "_generate", lambda *a, **k: calls.append(k) or generate(*a, **k))
    registry, cache = defense_registry(), ArtifactCache(tmp_path)
    split, classifier = _split(), _classifier()
    maep_train = dict(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, mask_ratio=0.5)
    recipes = {"maep": dict(MAEP_TINY, train=dict(maep_train, clean_fraction=0.0)),
               "maep-both": dict(MAEP_TINY, train=maep_train),
               "disco": dict(TINY, pairs=MAEP_TINY["pairs"])}
    contexts = {name: TrainContext(entry_name=name, config=config, train_split=split, classifier=classifier,
                                   seed=1, progress=False, artifacts=cache) for name, config in recipes.items()}
    cached = {name: registry.get(name).train(ctx) for name, ctx in contexts.items()}
    assert len(calls) == 1 and len(list((tmp_path / "pairs").iterdir())) == 1

    x_adv, x_clean = training_pairs(contexts["disco"], MAEP_TINY["pairs"])
    ref_adv, ref_clean = adversarial_pairs(classifier, split, seed=1, progress=False, **MAEP_TINY["pairs"])
    assert torch.equal(x_adv, ref_adv) and torch.equal(x_clean, ref_clean)
    direct = registry.get("disco").train(dataclasses.replace(contexts["disco"], artifacts=None))
    assert all(torch.equal(direct[k], v) for k, v in cached["disco"].items())  # cache or not, same weights

    training_pairs(dataclasses.replace(contexts["disco"], seed=2), MAEP_TINY["pairs"])
    assert len(list((tmp_path / "pairs").iterdir())) == 2  # another seed, other pairs

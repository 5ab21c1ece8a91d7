"""harness.toolkit.diffusion and the diffpure entry: randomness control, checkpointing, loading, training."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from harness.core.artifacts import ArtifactCache
from harness.core.context import BuildContext
from harness.data import Split, dataset_info
from harness.toolkit.diffusion import LoadedUNet, build_unet, ddpm_preset, load_unet, make_scheduler
from harness.toolkit.diffusion import train as diffusion_train
from harness.core.keys import state_fingerprint
from harness.toolkit.diffusion.sampler import Schedule
from harness.core.errors import UsageError
from harness.core.noise import FixedNoise
from defenses.diffpure import DIFFPURE, DiffPure

SHAPE = (3, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(seed: int = 0) -> LoadedUNet:
    config = ddpm_preset("tiny")
    unet = build_unet(config["unet"], SHAPE, seed).eval().requires_grad_(False)
    return LoadedUNet(unet, make_scheduler(config["schedule"]), {"source": "test"})


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def purifier() -> DiffPure:
    return DiffPure(tiny_unet(), tstar=0.3, steps=3)


def test_same_seed_is_bit_identical_across_calls_and_batch_compositions(purifier):
    x, noise = images(4), FixedNoise(7)
    with torch.no_grad():
        full = purifier(x, noise.draws([10, 11, 12, 13]))
        again = purifier(x, noise.draws([10, 11, 12, 13]))
        alone = purifier(x[2:3], noise.draws([12]))
        order = [3, 0, 2, 1]
        shuffled = purifier(x[order], noise.draws([10 + i for i in order]))
    assert torch.equal(full, again)
    assert torch.equal(full[2:3], alone)
    assert torch.equal(full[order], shuffled)


def test_different_seeds_or_indices_differ(purifier):
    x = images(2)
    with torch.no_grad():
        a = purifier(x, FixedNoise(0).draws([0, 1]))
        b = purifier(x, FixedNoise(1).draws([0, 1]))
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_global_rng_untouched(purifier):
    before = torch.get_rng_state()
    x = images(2).requires_grad_(True)
    out = purifier(x, FixedNoise(0).draws([0, 1]))
    torch.autograd.grad(out.sum(), x)
    DiffPure(tiny_unet(seed=3), tstar=0.5, steps=2)
    assert torch.equal(before, torch.get_rng_state())


def test_checkpointed_gradient_equals_plain_gradient():
    grads = []
    for use_checkpoint in (True, False):
        purifier = DiffPure(tiny_unet(), tstar=0.4, steps=4, use_checkpoint=use_checkpoint)
        x = images(3).requires_grad_(True)
        out = purifier(x, FixedNoise(3).draws([0, 1, 2]))
        grads.append(torch.autograd.grad((out * images(3, seed=1)).sum(), x)[0])
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_step_matches_diffusers_ddim(eta):
    loaded = tiny_unet()
    ddim = DDIMScheduler.from_config(loaded.scheduler.config, clip_sample=False, set_alpha_to_one=True)
    ddim.set_timesteps(10)  # stride 10 over 100 training steps
    schedule = Schedule(loaded.scheduler.alphas_cumprod)
    gen = torch.Generator().manual_seed(0)
    xt, eps, z = (torch.randn((2, *SHAPE), generator=gen) for _ in range(3))
    for t in (50, 0):
        expected = ddim.step(eps, t, xt, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(schedule.step(xt, t, t - 10 if t else -1, eps, z, eta), expected)


def test_schedule_timesteps():
    schedule = Schedule(make_scheduler(ddpm_preset("small")["schedule"]).alphas_cumprod)
    assert schedule.start_index(0.1) == 99
    assert schedule.timesteps(99, 10) == [99, 88, 77, 66, 55, 44, 33, 22, 11, 0]
    with pytest.raises(ValueError):
        schedule.timesteps(5, 7)


def test_from_pretrained_round_trip(tmp_path):
    loaded = tiny_unet(seed=5)
    loaded.unet.save_pretrained(tmp_path / "model")
    loaded.scheduler.save_pretrained(tmp_path / "model" / "scheduler")
    again = load_unet(str(tmp_path / "model"))
    x, t = images(2) * 2 - 1, 17
    with torch.no_grad():
        torch.testing.assert_close(again.unet(x, t).sample, loaded.unet(x, t).sample, rtol=0, atol=0)
    assert again.scheduler.config.num_train_timesteps == 100
    assert again.provenance["kind"] == "local" and again.provenance["source"] == str(tmp_path / "model")
    assert again.provenance["weights_sha256"] == state_fingerprint(loaded.unet.state_dict())
    with pytest.raises(UsageError, match="save_pretrained"):
        load_unet(str(tmp_path))


def _ctx(options: dict, weights=None) -> BuildContext:
    info = dataset_info("cifar10")
    return BuildContext(entry_name="diffpure", dataset=info, classifier=torch.nn.Flatten(), preset="tiny",
                        config=DIFFPURE.preset_config("tiny"), options=options,
                        weights=weights or (lambda: build_unet(ddpm_preset("tiny")["unet"], info.image_shape).state_dict()))


def test_entry_options_and_provenance(tmp_path):
    defense = DIFFPURE.build(_ctx({"tstar": 0.2, "steps": 2, "sampler": "ddim"}))
    purifier = defense.purifier
    assert purifier.timesteps == [19, 0] and purifier.eta == 0.0
    assert purifier.provenance["unet"]["source"] == "trained:tiny" and purifier.provenance["tstar"] == 0.2
    with pytest.raises(UsageError, match="did you mean 'tstar'.*valid: tstar"):
        DIFFPURE.check_options({"tsar": 0.2})
    with pytest.raises(UsageError, match="must be one of ddpm, ddim"):
        DIFFPURE.check_options({"sampler": "euler"})
    tiny_unet().unet.save_pretrained(tmp_path / "u")

    def no_weights():
        raise AssertionError("an explicit unet must not train")

    from_folder = DIFFPURE.build(_ctx({"unet": str(tmp_path / "u")}, weights=no_weights))
    assert from_folder.purifier.provenance["unet"]["kind"] == "local"


def _split(n: int = 16) -> Split:
    gen = torch.Generator().manual_seed(0)
    return Split(info=dataset_info("cifar10"), split="train",
                 images=torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8),
                 labels=torch.zeros(n, dtype=torch.long), fingerprint="synthetic", source="test")


def test_training_steps_and_shared_cache(tmp_path, monkeypatch):
    split = _split()
    before = torch.get_rng_state()
    state = diffusion_train.train_ddpm("tiny", split, seed=0, progress=False, steps=2)
    assert torch.equal(before, torch.get_rng_state())
    assert all(torch.equal(v, state[k]) for k, v in
               diffusion_train.train_ddpm("tiny", split, seed=0, progress=False, steps=2).items())
    fresh = build_unet(ddpm_preset("tiny")["unet"], (3, 32, 32), seed=0).state_dict()
    assert set(state) == set(fresh) and any(not torch.equal(state[k], fresh[k]) for k in state)
    cache = ArtifactCache(tmp_path / "artifacts")
    first = diffusion_train.shared_ddpm(cache, "tiny", split, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("the shared DDPM was trained twice")

    monkeypatch.setattr(diffusion_train, "train_ddpm", no_training)
    second = diffusion_train.shared_ddpm(cache, "tiny", split, progress=False)
    assert first.path == second.path and first.path.parent.name == "ddpm"
    assert "entry" not in second.recipe and "classifier" not in second.recipe


def test_hf_source_parsing_without_network(monkeypatch):
    import diffusers

    calls = []

    def fake_unet(location, subfolder=None):
        calls.append((location, subfolder))
        return tiny_unet().unet

    def no_scheduler(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(diffusers.UNet2DModel, "from_pretrained", fake_unet)
    monkeypatch.setattr(diffusers.DDPMScheduler, "from_pretrained", no_scheduler)
    loaded = load_unet("hf:google/ddpm-cifar10-32:unet")
    assert calls == [("google/ddpm-cifar10-32", "unet")]
    assert loaded.provenance["kind"] == "huggingface" and loaded.scheduler.config.num_train_timesteps == 1000

"""Diffusion-generated training data: the class-conditional DDPM's recipe, class balance, fingerprints and
determinism, classifier-free guidance, quality measures, and `harness data synth` / `data info`. Tiny
DDPM preset, a few training steps, a handful of images."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from harness.api import SyntheticSet, synthetic_set
from harness.cli import main
from harness.core.artifacts import ArtifactCache, recipe_hash
from harness.core.errors import UsageError
from harness.data import Split, dataset_info, load_split
from harness.data.disk import fingerprint
from harness.toolkit import synthetic as synth
from harness.toolkit.diffusion import conditional_ddpm_recipe, ddpm_recipe
from harness.toolkit.synthetic import class_balance, label_agreement, parse_sampler

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"sampler": "ddim:steps=2", "preset": "tiny", "progress": False}
# the unconditional recipe hashes of release artifacts: cached DDPMs and fixtures depend on them
UNCONDITIONAL = {"tiny": "58f63fb96ff0d09d", "small": "4a356af179970c20"}


def fake_split() -> Split:
    return Split(dataset_info("cifar10"), "train", torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
                 torch.zeros(1, dtype=torch.int64), "0123456789abcdef", "test")


def test_class_balance_is_as_even_as_possible():
    assert torch.bincount(class_balance(20, 10)).tolist() == [2] * 10
    assert torch.bincount(class_balance(23, 10)).tolist() == [3, 3, 3] + [2] * 7
    assert torch.bincount(class_balance(7, 10), minlength=10).tolist() == [1] * 7 + [0] * 3
    assert class_balance(5, 10).dtype == torch.int64


def test_conditional_recipe_is_its_own_kind_and_unconditional_hash_is_unchanged():
    split = fake_split()
    for preset, expected in UNCONDITIONAL.items():
        assert recipe_hash(ddpm_recipe(preset, split, 0)) == expected
        conditional = conditional_ddpm_recipe(preset, split, 0)
        assert conditional["conditional"] is True and conditional["label_dropout"] == 0.1
        assert conditional["null_class"] == conditional["num_classes"] == 10
        assert conditional["what"] == "ddpm-conditional"
        assert recipe_hash(conditional) != expected
        assert recipe_hash(conditional_ddpm_recipe(preset, split, 0, label_dropout=0.2)) != recipe_hash(conditional)
    assert "conditional" not in ddpm_recipe("tiny", split, 0)


def test_labels_follow_balance_and_fingerprint_follows_seed(tiny_cifar, harness_home, tmp_path, monkeypatch):
    cache = ArtifactCache()
    first = synthetic_set(cache, "cifar10", 20, seed=0, **TINY)
    assert isinstance(first, SyntheticSet)
    assert first.images.shape == (20, 3, 32, 32) and first.images.dtype == torch.uint8
    assert first.labels.dtype == torch.int64 and torch.bincount(first.labels).tolist() == [2] * 10
    assert first.fingerprint == fingerprint(first.images.numpy(), first.labels.numpy())
    prov = first.provenance
    json.dumps(prov)
    assert prov["fingerprint"] == first.fingerprint and prov["seed"] == 0 and prov["guidance"] == 1.0
    assert prov["sampler"] == "ddim:steps=2" and prov["class_balance"]["counts"] == [2] * 10
    generator = prov["generator"]["artifact"]
    assert (cache.root / "ddpm" / generator / "weights.safetensors").is_file()
    assert first.path is not None and first.path.parent.name == "synthetic"

    again = synthetic_set(cache, "cifar10", 20, seed=0, **TINY)
    assert again.fingerprint == first.fingerprint and again.path == first.path
    other = synthetic_set(cache, "cifar10", 20, seed=1, **TINY)
    assert other.fingerprint != first.fingerprint and torch.equal(other.labels, first.labels)

    # regenerated from scratch (fresh cache, in other batch sizes): the same images for the same seed
    monkeypatch.setattr(synth, "GENERATION_BATCH", 3)
    fresh = synthetic_set(ArtifactCache(tmp_path / "fresh"), "cifar10", 20, seed=0, **TINY)
    assert fresh.provenance["generator"]["artifact"] == generator
    assert (fresh.images.int() - first.images.int()).abs().max() <= 1  # batched CPU kernels: last bits only

    odd = synthetic_set(cache, "cifar10", 13, seed=0, **TINY)
    assert torch.bincount(odd.labels).tolist() == [2, 2, 2] + [1] * 7


def test_guidance_changes_outputs(tiny_cifar, harness_home):
    cache = ArtifactCache()
    plain = synthetic_set(cache, "cifar10", 10, guidance=0.0, **TINY)
    guided = synthetic_set(cache, "cifar10", 10, guidance=3.0, **TINY)
    assert plain.provenance["generator"] == guided.provenance["generator"]
    assert plain.fingerprint != guided.fingerprint
    assert (plain.images.int() - guided.images.int()).abs().amax(dim=(1, 2, 3)).min() > 0


def test_ddpm_sampler_uses_step_noise(tiny_cifar, harness_home):
    spec = parse_sampler("ddpm:steps=3")
    assert (spec.name, spec.steps, spec.eta, spec.text) == ("ddpm", 3, 1.0, "ddpm:steps=3")
    assert parse_sampler("ddim:steps=4,eta=0.5").text == "ddim:steps=4,eta=0.5"
    made = synthetic_set(ArtifactCache(), "cifar10", 4, sampler="ddpm:steps=3", preset="tiny", progress=False)
    assert made.provenance["eta"] == 1.0 and made.images.shape == (4, 3, 32, 32)


def test_label_agreement_is_stored_and_shown_by_data_info(tiny_cifar, harness_home, classifier_file):
    cache = ArtifactCache()
    made = synthetic_set(cache, "cifar10", 10, **TINY)
    result = label_agreement(cache, made, classifier_file, progress=False)
    assert 0.0 <= result["agreement"] <= 1.0 and len(result["per_class"]) == 10 and result["n"] == 10
    stored = synthetic_set(cache, "cifar10", 10, **TINY)
    assert stored.provenance["quality"]["label_agreement"][result["classifier"]]["agreement"] == result["agreement"]
    info = CliRunner().invoke(main, ["data", "info"])
    assert info.exit_code == 0, info.output
    [line] = [row for row in info.output.splitlines() if row.startswith("synthetic=")]
    assert f"fingerprint={made.fingerprint}" in line and "n=10" in line and "guidance=1.0" in line
    assert f"agreement={result['agreement']:.4f}" in line and "sampler=ddim:steps=2" in line


def test_fid_without_inception_weights_is_one_line(tiny_cifar, harness_home, monkeypatch):
    made = synthetic_set(ArtifactCache(), "cifar10", 4, **TINY)
    real = load_split("cifar10", "train")
    import torchmetrics.image.fid as fid_module

    def offline(*args, **kwargs):
        raise OSError("could not download pt_inception-2015-12-05.pth\n<urlopen error [Errno -3] "
                      "Temporary failure in name resolution>")

    monkeypatch.setattr(fid_module, "FrechetInceptionDistance", offline)
    with pytest.raises(UsageError) as err:
        synth.frechet_distance(made, real, progress=False)
    message = str(err.value)
    assert "\n" not in message and "Inception" in message and "label agreement" in message


def test_data_synth_cli_end_to_end(tiny_cifar, harness_home):
    args = ["data", "synth", "--dataset", "cifar10", "--n", "12", "--sampler", "ddim:steps=2", "--guidance", "0.5",
            "--seed", "3", "--preset", "tiny", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    path, summary = result.stdout.splitlines()[:2]
    assert "/synthetic/" in path and "n=12" in summary and "seed=3" in summary and "guidance=0.5" in summary
    assert "class_counts=2,2,1,1,1,1,1,1,1,1" in summary
    again = CliRunner().invoke(main, args)
    assert again.stdout.splitlines()[:2] == [path, summary]  # cached, not regenerated
    made = synthetic_set(ArtifactCache(), "cifar10", 12, sampler="ddim:steps=2", guidance=0.5, seed=3,
                         preset="tiny", progress=False)
    assert str(made.path) == path and f"fingerprint={made.fingerprint}" in summary


@pytest.mark.parametrize(("override", "expected"), [
    ({"--n": "0"}, "integer >= 1"),
    ({"--sampler": "dpm:steps=3"}, "valid: ddpm:steps=K, ddim:steps=K"),
    ({"--sampler": "ddim:stpes=3"}, "did you mean 'steps'"),
    ({"--sampler": "ddim:steps=0"}, "steps must be in [1, 100]"),
    ({"--sampler": "ddim:steps=x"}, "valid: steps=K"),
    ({"--dataset": "cifar11"}, "valid: cifar10, cifar100"),
    ({"--guidance": "-1"}, "guidance must be a finite number >= 0"),
    ({"--preset": "huge"}, "valid: tiny, small, paper"),
])
def test_data_synth_bad_input_is_one_line(tiny_cifar, harness_home, override, expected):
    options = {"--dataset": "cifar10", "--n": "4", "--sampler": "ddim:steps=2", "--preset": "tiny"}
    options.update(override)
    result = CliRunner().invoke(main, ["data", "synth", "--no-progress"] + [a for kv in options.items() for a in kv])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error:") and expected in line, line
    assert not (harness_home / "artifacts" / "synthetic").exists()  # nothing generated

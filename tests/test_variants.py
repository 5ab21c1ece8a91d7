"""Dataset variants: Reinhard colour transfer and the colour corruptions of CIFAR-10-C."""

from __future__ import annotations

import pytest
import torch
from kornia.color import rgb_to_lab

from harness.data import DatasetInfo, Split
from harness.data.disk import fingerprint
from harness.data.variants import (CORRUPTIONS, _color_targets, apply_variant, corrupt, parse_variant,
                                   reinhard_transfer, variant_names)
from harness.core.errors import UsageError


def _split(n: int = 12, channels: int = 3, seed: int = 0) -> Split:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(40, 200, (n, channels, 1, 1), generator=gen)
    images = (base + torch.randint(-40, 40, (n, channels, 16, 16), generator=gen)).clamp(0, 255).to(torch.uint8)
    labels = torch.arange(n) % 10
    info = DatasetInfo("toy", 10, (channels, 16, 16), tuple(str(i) for i in range(10)))
    return Split(info, "test", images, labels, fingerprint(images.numpy(), labels.numpy()), "toy source")


def _lab_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lab = rgb_to_lab(x)
    return lab.mean(dim=(2, 3)), lab.std(dim=(2, 3))


def test_reinhard_matches_target_lab_statistics():
    gen = torch.Generator().manual_seed(0)
    # colours well inside the sRGB gamut, so that no clipping interferes with the matching
    source = 0.3 + 0.4 * torch.rand(6, 3, 32, 32, generator=gen)
    target = 0.25 + 0.5 * torch.rand(6, 3, 32, 32, generator=gen) * torch.tensor([1, .5, .8]).view(1, 3, 1, 1)
    out = reinhard_transfer(source, target)
    (mu_o, sd_o), (mu_t, sd_t) = _lab_stats(out), _lab_stats(target)
    assert torch.allclose(mu_o, mu_t, atol=1e-3) and torch.allclose(sd_o, sd_t, atol=1e-3)
    # after uint8 quantisation the statistics still agree within a small fraction of one Lab unit
    (mu_q, sd_q) = _lab_stats(out.mul(255).round() / 255)
    assert torch.allclose(mu_q, mu_t, atol=0.1) and torch.allclose(sd_q, sd_t, atol=0.1)


def test_colored_variant_uses_fixed_other_targets():
    targets = _color_targets(50, seed=3)
    assert not (targets == torch.arange(50)).any()
    assert torch.equal(targets, _color_targets(50, seed=3))
    assert not torch.equal(targets, _color_targets(50, seed=4))
    split = _split()
    colored = apply_variant(split, "colored")
    assert colored.images.dtype == torch.uint8 and colored.images.shape == split.images.shape
    assert torch.equal(colored.labels, split.labels)
    assert "colored" in colored.source and colored.fingerprint != split.fingerprint
    assert torch.equal(colored.images, apply_variant(split, "colored").images)
    # each image moves toward its target's Lab mean (clipping at the gamut limits allows small misses)
    t = _color_targets(len(split.labels), 0)
    mu_c, _ = _lab_stats(colored.float_images())
    mu_t, _ = _lab_stats(split.float_images(t))
    mu_s, _ = _lab_stats(split.float_images())
    assert (mu_c - mu_t).abs().mean() < 0.1 * (mu_s - mu_t).abs().mean()


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_zero_is_identity(name):
    split = _split()
    assert apply_variant(split, f"corrupt:{name}:0") is split
    x = split.float_images()
    assert torch.equal(corrupt(x, name, 0), x)
    assert apply_variant(split, "clean") is split


def test_corruptions_follow_hendrycks_dietterich():
    x = _split().float_images()
    contrast = corrupt(x, "contrast", 5)  # CIFAR-10-C: c = 0.15 around the per-channel mean
    means = x.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(contrast, ((x - means) * 0.15 + means).clamp(0, 1), atol=1e-6)
    grey = torch.full((1, 3, 8, 8), 0.5)
    assert torch.allclose(corrupt(grey, "brightness", 3), torch.full_like(grey, 0.65), atol=1e-5)
    assert torch.allclose(corrupt(grey, "saturate", 2), grey, atol=1e-5)  # s = 0 * 0.1 + 0
    vivid = torch.tensor([0.8, 0.4, 0.2]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    desat = corrupt(vivid, "saturate", 1)  # s * 0.3: channels move toward the max
    assert torch.allclose(desat[0, :, 0, 0], torch.tensor([0.8, 0.68, 0.62]), atol=1e-5)
    large = torch.full((1, 3, 64, 64), 0.5)  # > 32 px: ImageNet-C table, brightness c = 0.3 at 3
    assert torch.allclose(corrupt(large, "brightness", 3), torch.full_like(large, 0.8), atol=1e-5)


def test_fingerprints_differ_per_variant():
    split = _split()
    names = ["colored"] + [f"corrupt:{c}:{s}" for c in CORRUPTIONS for s in (1, 5)]
    prints = {apply_variant(split, name).fingerprint for name in names}
    assert len(prints) == len(names) and split.fingerprint not in prints


def test_grey_images_stay_one_channel():
    split = _split(channels=1)
    for name in ("colored", "corrupt:brightness:2", "corrupt:saturate:5"):
        out = apply_variant(split, name)
        assert out.images.shape == split.images.shape and out.images.dtype == torch.uint8


def test_bad_names_list_valid_ones():
    assert "clean" in variant_names() and "corrupt:saturate:5" in variant_names()
    assert parse_variant("corrupt:contrast:3") == ("corrupt", ("contrast", 3))
    for bad in ("colour", "corrupt:fog:1", "corrupt:contrast:6", "corrupt:contrast", "corrupt:contrast:x"):
        with pytest.raises(UsageError, match="valid: clean, colored"):
            apply_variant(_split(), bad)


_FINGERPRINT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
from harness.data import DatasetInfo, Split
from harness.data.disk import fingerprint
from harness.data.variants import apply_variant
gen = torch.Generator().manual_seed(3)
images = torch.randint(0, 256, (256, 3, 32, 32), generator=gen, dtype=torch.uint8)
labels = torch.arange(256) % 10
info = DatasetInfo("toy", 10, (3, 32, 32), tuple(str(i) for i in range(10)))
split = Split(info, "test", images, labels, fingerprint(images.numpy(), labels.numpy()), "toy")
print(torch.backends.cpu.get_cpu_capability(), apply_variant(split, "colored").fingerprint)
"""


def test_colored_images_are_the_same_on_every_cpu_kernel():
    """A variant cell is keyed by its images: the colour transfer (float64) must not depend on the CPU
    kernels torch dispatches to (in float32 the non-vectorised and the AVX kernels gave other images)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    prints = set()
    for capability in ("default", ""):  # the scalar kernels, then the machine's own (AVX2/AVX-512 on x86)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("ATEN_CPU_CAPABILITY", None)
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        out = subprocess.run([sys.executable, "-c", _FINGERPRINT, str(Path(__file__).parent)], env=env,
                             capture_output=True, text=True, check=True).stdout.split()
        prints.add(out[1])
        assert capability != "default" or out[0] == "DEFAULT"
    assert len(prints) == 1

"""Dataset variants: deterministic transforms of a test split (colour shift and colour corruptions).

* ``clean``: the split itself.
* ``colored``: Reinhard et al., "Color Transfer between Images", IEEE CG&A 2001, as used for
  ColoredImageNet by Chen & Lu (arXiv 2501.16904, Sec. 5.1): each image's per-channel CIE-Lab mean and
  standard deviation are matched to those of a target image of the same split (never itself), drawn
  with a fixed seed. Lab here is kornia's (sRGB, D65), a stand-in for Reinhard's l-alpha-beta space.
* ``corrupt:<name>:<severity>``: the colour corruptions of ImageNet-C / CIFAR-10-C (Hendrycks &
  Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR
  2019) with their severity parameters: ``brightness`` (add c to HSV value), ``contrast`` (scale by c
  around the per-channel image mean), ``saturate`` (HSV saturation s*c0 + c1). Images at most 32 px
  high use the CIFAR-10-C table, larger ones the ImageNet-C table. Severity 0 is the identity. HSV
  conversions are kornia's; kornia's ``adjust_brightness`` / ``adjust_contrast`` / ``adjust_saturation``
  are not used because they differ from Hendrycks & Dietterich's definitions (RGB shift instead of HSV
  value, scaling towards 0 instead of the mean, no additive saturation term).

One-channel images are treated as grey RGB and averaged back to one channel. Results are stored as
uint8 (rounded); the variant gets its own content fingerprint and a ``source`` naming the variant.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from kornia.color import hsv_to_rgb, lab_to_rgb, rgb_to_hsv, rgb_to_lab

from harness.data.store import Split, fingerprint
from harness.errors import UsageError

#: Joins a split's data source and the variant applied to it (``"<source>; variant colored (...)"``).
VARIANT_SEPARATOR = "; variant "

__all__ = ["VARIANT_SEPARATOR", "CORRUPTIONS", "SEVERITIES", "variant_names", "parse_variant", "apply_variant",
           "reinhard_transfer", "corrupt"]

SEVERITIES = (0, 1, 2, 3, 4, 5)
_CHUNK = 512
_STD_FLOOR = 1e-6

# (CIFAR-10-C, ImageNet-C) parameters for severities 1..5 (Hendrycks & Dietterich, make_*_c.py).
_PARAMS: dict[str, tuple[tuple, tuple]] = {
    "brightness": ((.05, .1, .15, .2, .3), (.1, .2, .3, .4, .5)),
    "contrast": ((.75, .5, .4, .3, .15), (.4, .3, .2, .1, .05)),
    "saturate": (((.3, 0), (.1, 0), (1.5, 0), (2, .1), (2.5, .2)),
                 ((.3, 0), (.1, 0), (2, 0), (5, .1), (20, .2))),
}
CORRUPTIONS = tuple(_PARAMS)


def variant_names() -> list[str]:
    """Every valid variant name (``corrupt:*`` at severities 1-5; severity 0 is accepted too)."""
    return ["clean", "colored"] + [f"corrupt:{c}:{s}" for c in CORRUPTIONS for s in SEVERITIES[1:]]


def _bad(name: str) -> UsageError:
    return UsageError(f"unknown dataset variant {name!r}; valid: clean, colored, corrupt:<name>:<severity> "
                      f"with name in {', '.join(CORRUPTIONS)} and severity 0-5 (e.g. corrupt:contrast:3)")


def parse_variant(name: str) -> tuple[str, str | None, int]:
    """``(kind, corruption, severity)`` of a variant name; UsageError naming the valid ones otherwise."""
    if name in ("clean", "colored"):
        return name, None, 0
    parts = name.split(":")
    if len(parts) != 3 or parts[0] != "corrupt" or parts[1] not in _PARAMS or not parts[2].isdigit() \
            or int(parts[2]) not in SEVERITIES:
        raise _bad(name)
    return "corrupt", parts[1], int(parts[2])


def _as_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _back(rgb: torch.Tensor, channels: int) -> torch.Tensor:
    out = rgb.mean(dim=1, keepdim=True) if channels == 1 else rgb
    return out.clamp(0, 1)


def reinhard_transfer(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Colour transfer of ``source`` toward ``target`` (both (N, C, H, W) float in [0, 1]).

    In Lab, each channel of each source image is standardised and rescaled to the target image's
    per-channel mean and std; the result is converted back to RGB and clamped to [0, 1].
    """
    src, tgt = rgb_to_lab(_as_rgb(source)), rgb_to_lab(_as_rgb(target))
    mu_s, sd_s = src.mean(dim=(2, 3), keepdim=True), src.std(dim=(2, 3), keepdim=True)
    mu_t, sd_t = tgt.mean(dim=(2, 3), keepdim=True), tgt.std(dim=(2, 3), keepdim=True)
    lab = (src - mu_s) / sd_s.clamp_min(_STD_FLOOR) * sd_t + mu_t
    return _back(lab_to_rgb(lab, clip=True), source.shape[1])


def _params(name: str, severity: int, height: int):
    cifar, imagenet = _PARAMS[name]
    return (cifar if height <= 32 else imagenet)[severity - 1]


def _hsv_map(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    hsv = rgb_to_hsv(_as_rgb(x))
    return _back(hsv_to_rgb(fn(hsv)), x.shape[1])


def corrupt(x: torch.Tensor, name: str, severity: int) -> torch.Tensor:
    """Corruption ``name`` at ``severity`` (0-5; 0 returns ``x``) of (N, C, H, W) images in [0, 1]."""
    if name not in _PARAMS or severity not in SEVERITIES:
        raise _bad(f"corrupt:{name}:{severity}")
    if severity == 0:
        return x
    c = _params(name, severity, x.shape[-2])
    if name == "contrast":
        means = x.mean(dim=(2, 3), keepdim=True)
        return ((x - means) * c + means).clamp(0, 1)
    if name == "brightness":
        return _hsv_map(x, lambda hsv: torch.cat([hsv[:, :2], (hsv[:, 2:] + c).clamp(0, 1)], 1))
    scale, shift = c
    return _hsv_map(x, lambda hsv: torch.cat([hsv[:, :1], (hsv[:, 1:2] * scale + shift).clamp(0, 1),
                                              hsv[:, 2:]], 1))


def _color_targets(n: int, seed: int) -> torch.Tensor:
    """For each image, the index of its target: uniform over the other images, fixed by ``seed``."""
    if n < 2:
        raise UsageError("the 'colored' variant needs at least two images in the split")
    gen = torch.Generator().manual_seed(int(seed))
    return (torch.arange(n) + torch.randint(1, n, (n,), generator=gen)) % n


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def apply_variant(split: Split, variant: str, seed: int = 0) -> Split:
    """``split`` transformed by ``variant`` (see the module docstring); ``clean`` and severity 0 return
    ``split`` itself. ``seed`` fixes the colour-transfer targets."""
    kind, name, severity = parse_variant(variant)
    if kind == "clean" or (kind == "corrupt" and severity == 0):
        return split
    n = len(split.labels)
    targets = _color_targets(n, seed) if kind == "colored" else None
    chunks = []
    with torch.no_grad():
        for start in range(0, n, _CHUNK):
            index = torch.arange(start, min(start + _CHUNK, n))
            x = split.float_images(index)
            out = reinhard_transfer(x, split.float_images(targets[index])) if targets is not None \
                else corrupt(x, name, severity)
            chunks.append(_to_uint8(out))
    images = torch.cat(chunks).contiguous()
    detail = f"seed {seed}" if kind == "colored" else "Hendrycks & Dietterich parameters"
    return replace(split, images=images, fingerprint=fingerprint(images.numpy(), split.labels.numpy()),
                   source=f"{split.source}{VARIANT_SEPARATOR}{variant} ({detail})")

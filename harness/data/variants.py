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

Variant kinds are registered in :func:`variant_registry` (entry-point group ``harness.variants``): a
:class:`VariantKind` parses the arguments after its name (``corrupt:contrast:3`` -> ``("contrast", "3")``)
and maps float images in [0, 1] to float images in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from kornia.color import hsv_to_rgb, lab_to_rgb, rgb_to_hsv, rgb_to_lab

from harness.core.errors import UsageError
from harness.core.registry import Registry, suggest
from harness.data.disk import Split, fingerprint

#: Joins a split's data source and the variant applied to it (``"<source>; variant colored (...)"``).
VARIANT_SEPARATOR = "; variant "

__all__ = ["VARIANT_SEPARATOR", "CORRUPTIONS", "SEVERITIES", "VariantKind", "variant_registry", "variant_names",
           "parse_variant", "apply_variant", "reinhard_transfer", "corrupt"]

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
    kinds = variant_registry().items()
    return UsageError(f"unknown dataset variant {name!r}{suggest(name, variant_names())}; "
                      f"valid: {', '.join(k.value.syntax for k in kinds)} "
                      f"with name in {', '.join(CORRUPTIONS)} and severity 0-5 (e.g. corrupt:contrast:3)")


def parse_variant(name: str) -> tuple[str, tuple[Any, ...]]:
    """``(kind, arguments)`` of a variant name (``("corrupt", ("contrast", 3))``); a UsageError naming
    the valid ones otherwise."""
    kind, *args = name.split(":")
    if kind not in variant_registry().names():
        raise _bad(name)
    parsed = variant_registry().get(kind).parse(tuple(args))
    if parsed is None:
        raise _bad(name)
    return kind, parsed


def _as_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _back(rgb: torch.Tensor, channels: int) -> torch.Tensor:
    out = rgb.mean(dim=1, keepdim=True) if channels == 1 else rgb
    return out.clamp(0, 1)


def reinhard_transfer(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Colour transfer of ``source`` toward ``target`` (both (N, C, H, W) float in [0, 1]).

    In Lab, each channel of each source image is standardised and rescaled to the target image's
    per-channel mean and std; the result is converted back to RGB and clamped to [0, 1]. Computed in
    float64: in float32 the conversions' rounding depends on the CPU kernels (the variant's images, and
    so its cells' keys, differed between machines), in float64 the uint8 images come out the same.
    """
    src, tgt = rgb_to_lab(_as_rgb(source).double()), rgb_to_lab(_as_rgb(target).double())
    mu_s, sd_s = src.mean(dim=(2, 3), keepdim=True), src.std(dim=(2, 3), keepdim=True)
    mu_t, sd_t = tgt.mean(dim=(2, 3), keepdim=True), tgt.std(dim=(2, 3), keepdim=True)
    lab = (src - mu_s) / sd_s.clamp_min(_STD_FLOOR) * sd_t + mu_t
    return _back(lab_to_rgb(lab, clip=True), source.shape[1]).to(source.dtype)


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
    """``split`` transformed by ``variant`` (see the module docstring); an identity variant (``clean``,
    severity 0) returns ``split`` itself. ``seed`` fixes the colour-transfer targets."""
    kind, args = parse_variant(variant)
    spec = variant_registry().get(kind)
    if spec.identity(args):
        return split
    transform = spec.transform(split, args, seed)
    n, chunks = len(split.labels), []
    with torch.no_grad():
        for start in range(0, n, _CHUNK):
            index = torch.arange(start, min(start + _CHUNK, n))
            chunks.append(_to_uint8(transform(split.float_images(index), index)))
    images = torch.cat(chunks).contiguous()
    return replace(split, images=images, fingerprint=fingerprint(images.numpy(), split.labels.numpy()),
                   source=f"{split.source}{VARIANT_SEPARATOR}{variant} ({spec.detail(args, seed)})")


Transform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, their indices) -> images


@dataclass(frozen=True)
class VariantKind:
    """A kind of dataset variant: ``parse`` checks the arguments after its name (``None``: invalid),
    ``transform(split, args, seed)`` gives the image map, ``detail`` the note stored in the source."""

    name: str
    syntax: str
    summary: str
    paper: str
    parse: Callable[[tuple[str, ...]], tuple[Any, ...] | None]
    transform: Callable[[Split, tuple[Any, ...], int], Transform]
    identity: Callable[[tuple[Any, ...]], bool] = lambda args: False
    detail: Callable[[tuple[Any, ...], int], str] = lambda args, seed: ""


def _no_args(args: tuple[str, ...]) -> tuple[Any, ...] | None:
    return () if not args else None


def _corruption_args(args: tuple[str, ...]) -> tuple[Any, ...] | None:
    if len(args) != 2 or args[0] not in _PARAMS or args[1] not in map(str, SEVERITIES):
        return None
    return args[0], int(args[1])


def _colored(split: Split, args: tuple[Any, ...], seed: int) -> Transform:
    targets = _color_targets(len(split.labels), seed)
    return lambda x, index: reinhard_transfer(x, split.float_images(targets[index]))


def _corrupted(split: Split, args: tuple[Any, ...], seed: int) -> Transform:
    name, severity = args
    return lambda x, index: corrupt(x, name, severity)


VARIANT_GROUP = "harness.variants"
_registry: Registry[VariantKind] | None = None


def variant_registry() -> Registry[VariantKind]:
    """Every kind of dataset variant: harness's own, then plugins of the ``harness.variants`` group."""
    global _registry
    if _registry is None:
        registry: Registry[VariantKind] = Registry("variant", group=VARIANT_GROUP, expects=VariantKind,
                                                   describe=lambda v: (v.summary, v.paper),
                                                   name_of=lambda v: v.name)
        for kind in (
            VariantKind("clean", "clean", "the test split itself", "", _no_args, lambda s, a, seed: None,
                        identity=lambda args: True),
            VariantKind("colored", "colored", "Reinhard colour transfer to another image of the split",
                        "Reinhard et al., IEEE CG&A 2001; Chen & Lu, arXiv 2501.16904", _no_args, _colored,
                        detail=lambda args, seed: f"seed {seed}"),
            VariantKind("corrupt", "corrupt:<name>:<severity>",
                        f"colour corruption ({', '.join(CORRUPTIONS)}) at severity 0-5",
                        "Hendrycks & Dietterich, ICLR 2019", _corruption_args, _corrupted,
                        identity=lambda args: args[1] == 0,
                        detail=lambda args, seed: "Hendrycks & Dietterich parameters"),
        ):
            registry.add(kind.name, kind)
        _registry = registry
    return _registry

"""Image-quality metrics between purified and clean images: PSNR, SSIM (torchmetrics) and l_p distances.

PSNR and SSIM are computed per image on [0, 1] images (data range 1). SSIM uses the usual Gaussian
window (11 x 11, sigma 1.5; Wang et al., "Image quality assessment: from error visibility to structural
similarity", IEEE TIP 2004). PSNR is infinite for identical images; it is capped at :data:`PSNR_CAP`
dB so that means over images stay finite (a cap of 100 dB corresponds to an MSE of 1e-10, far below
one uint8 step, 20*log10(255) ~ 48 dB).

Per cell (MAEP paper, Table 1), :func:`batch_quality` measures a batch of purified clean and purified
adversarial images against the clean images, and :func:`merge_quality` folds it into the cell's
``metrics`` (means ``psnr_clean``, ``ssim_clean``, ``psnr_adv``, ``ssim_adv`` plus running sums under
``quality``, so an interrupted cell resumes its averages exactly).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from harness.core.noise import NoiseSource
from harness.core.passes import gradient_free

__all__ = ["PSNR_CAP", "psnr", "ssim", "lp_distance", "quality", "batch_quality", "merge_quality"]

#: Upper bound of :func:`psnr`, in dB (reached by identical images).
PSNR_CAP = 100.0


def _check(x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.shape != ref.shape or x.dim() != 4:
        raise ValueError(f"expected two (N, C, H, W) batches of one shape, got {tuple(x.shape)} and "
                         f"{tuple(ref.shape)}")


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``x`` against ``ref`` (both (N, C, H, W) in [0, 1]), capped at 100."""
    _check(x, ref)
    if len(x) == 0:
        return x.new_zeros(0)
    from torchmetrics.functional.image import peak_signal_noise_ratio  # 0.5 s to import: only when measured

    values = peak_signal_noise_ratio(x.detach().float(), ref.detach().float(), data_range=1.0,
                                     reduction="none", dim=(1, 2, 3))
    return values.clamp(max=PSNR_CAP)


def ssim(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of ``x`` against ``ref`` (both (N, C, H, W) in [0, 1]); 1 for identical images."""
    _check(x, ref)
    if len(x) == 0:
        return x.new_zeros(0)
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(x.detach().float(), ref.detach().float(), data_range=1.0,
                                               reduction="none")


def lp_distance(x: torch.Tensor, ref: torch.Tensor, p: float | str) -> torch.Tensor:
    """Per-image l_p distance ``||x - ref||_p`` over all pixels; ``p`` is a number, ``"inf"`` or ``"linf"``."""
    _check(x, ref)
    order = float("inf") if p in ("inf", "linf", float("inf")) else float(p)
    return torch.linalg.vector_norm((x.detach() - ref.detach()).flatten(1).float(), ord=order, dim=1)


def quality(x: torch.Tensor, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image ``psnr``, ``ssim``, ``l2`` and ``linf`` of ``x`` against ``ref``."""
    return {"psnr": psnr(x, ref), "ssim": ssim(x, ref), "l2": lp_distance(x, ref, 2),
            "linf": lp_distance(x, ref, "inf")}


def batch_quality(defense: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, noise: NoiseSource,
                  indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR/SSIM of ``defense.purify`` output against the clean ``x``: ``*_clean`` for every
    clean input, ``*_adv`` only for the images the attack changed (``x_adv != x``; the protocols leave
    misclassified images unattacked, and counting them would mix in capped PSNRs). Draws the purifier's
    randomness from ``noise`` for ``indices``, as the evaluation does."""
    attacked = (x_adv != x).flatten(1).any(dim=1)
    with gradient_free(defense):
        clean = defense.purify(x, noise.draws(indices))
        adv = defense.purify(x_adv[attacked], noise.draws(indices[attacked])) if attacked.any() \
            else x[attacked]
    return {"psnr_clean": psnr(clean, x), "ssim_clean": ssim(clean, x),
            "psnr_adv": psnr(adv, x[attacked]), "ssim_adv": ssim(adv, x[attacked])}


def merge_quality(metrics: Mapping[str, Any] | None, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A new ``metrics`` dict with ``batch`` (from :func:`batch_quality`) added to its running means;
    per-metric counts and sums are kept under ``quality``."""
    out = dict(metrics or {})
    state = out.get("quality") or {}
    counts, sums = dict(state.get("counts", {})), dict(state.get("sums", {}))
    for name, values in batch.items():
        counts[name] = counts.get(name, 0) + values.numel()
        sums[name] = sums.get(name, 0.0) + float(values.double().sum())
    out["quality"] = {"counts": counts, "sums": sums}
    out.update({name: sums[name] / counts[name] for name in sums if counts[name]})
    return out

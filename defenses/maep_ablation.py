"""The loss designs of the MAEP paper's ablation (Chen & Lu, arXiv:2501.16904, Appendix Sec. 8, Table 10)
as defense entries. Each trains :class:`defenses.maep.MAEPurifier` on the same PGD pairs with the same
loop as ``maep``; only the objective differs (mask ratio 0 at inference for all).

* ``maep-mlm`` (Eqs. 4, 17, 18): MAE pre-training by masked reconstruction of the *input* itself (loss on
  the masked patches only, He et al. CVPR 2022) on the adversarial training images, no purification;
  then ``finetune_epochs`` epochs of the purification loss ``|| D(E(x_adv)) - x ||_1`` at mask ratio 0.
  With ``finetune_epochs`` 0 it is plain MLM.
* ``maep-both`` ("Reconstruction", Eq. 16): purify both inputs, ``|| P(x_adv) - x ||_1 + || P(x) - x ||_1``,
  with ``P`` the masked autoencoder at MAEP's mask ratio.
* ``maep-trades-pixel`` (Eq. 20): ``|| P(x) - x ||_1 + beta || P(x_adv) - P(x) ||_1``.

The masks, ``beta`` = 1 and the two-stage split of ``maep-mlm`` are our reading of the appendix, whose
symbols were lost in extraction. TRADES in latent space (Eq. 21) needs the encoder's output, which
``MAEPurifier`` does not expose yet.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from defenses.maep import MAEP, PRESETS as MAEP_PRESETS, maep_loss, new_purifier
from harness.api import DefenseEntry, LossFn, Stage, train_on_pairs

if TYPE_CHECKING:  # pragma: no cover - typing only
    from harness.api import TrainContext

__all__ = ["MAEP_MLM", "MAEP_BOTH", "MAEP_TRADES_PIXEL", "mlm_loss", "both_loss", "trades_pixel_loss"]


def _patch_mask(model: nn.Module, batch: int, mask_ratio: float, state: torch.Tensor) -> torch.Tensor:
    """The (B, 1, H, W) 0/1 mask (1 = masked) that ``MAEPurifier.reconstruct`` drew from a generator in
    ``state``: it keeps the first ``keep`` patches of ``torch.rand(B, n).argsort(1)``."""
    n = model.grid * model.grid
    keep = n - int(round(n * mask_ratio))
    visible = torch.rand(batch, n, generator=torch.Generator().set_state(state)).argsort(dim=1)[:, :keep]
    masked = torch.ones(batch, n).scatter(1, visible, 0.0).view(batch, 1, model.grid, model.grid)
    return masked.repeat_interleave(model.patch_size, 2).repeat_interleave(model.patch_size, 3)


def mlm_loss(mask_ratio: float) -> LossFn:
    """Eq. 4 on the adversarial input: L1 between ``D(E((1 - M) * x_adv))`` and ``x_adv`` on masked patches."""

    def loss(model: nn.Module, x_adv: torch.Tensor, x_clean: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        state = generator.get_state()
        out = model.reconstruct(x_adv, mask_ratio, generator).float()
        mask = _patch_mask(model, len(x_adv), mask_ratio, state).to(out)
        return ((out - x_adv).abs() * mask).sum() / (mask.sum() * x_adv.shape[1]).clamp_min(1)

    return loss


def both_loss(mask_ratio: float) -> LossFn:
    """Eq. 16: purified adversarial and purified clean images both against the clean image."""

    def loss(model: nn.Module, x_adv: torch.Tensor, x_clean: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        adv = model.reconstruct(x_adv, mask_ratio, generator).float()
        clean = model.reconstruct(x_clean, mask_ratio, generator).float()
        return (adv - x_clean).abs().mean() + (clean - x_clean).abs().mean()

    return loss


def trades_pixel_loss(mask_ratio: float, beta: float) -> LossFn:
    """Eq. 20: keep the purified clean image, pull the purified adversarial image toward it."""

    def loss(model: nn.Module, x_adv: torch.Tensor, x_clean: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        clean = model.reconstruct(x_clean, mask_ratio, generator).float()
        adv = model.reconstruct(x_adv, mask_ratio, generator).float()
        return (clean - x_clean).abs().mean() + beta * (adv - clean).abs().mean()

    return loss


Stages = Callable[[dict[str, Any]], list[Stage]]


def _train_with(stages: Stages) -> Callable[["TrainContext"], dict[str, torch.Tensor]]:
    """A ``train`` recipe: MAEP's pairs and model, then each ``(loss, settings)`` stage in turn."""

    def train(ctx: "TrainContext") -> dict[str, torch.Tensor]:
        return train_on_pairs(ctx, new_purifier, stages(dict(ctx.config["train"])))

    return train


def _mlm_stages(settings: dict[str, Any]) -> list[Stage]:
    finetune = settings.pop("finetune_epochs")
    stages = [(mlm_loss(settings.pop("mask_ratio")), settings)]
    if finetune:
        stages.append((maep_loss(0.0), dict(settings, epochs=finetune)))
    return stages


def _both_stages(settings: dict[str, Any]) -> list[Stage]:
    return [(both_loss(settings.pop("mask_ratio")), settings)]


def _trades_stages(settings: dict[str, Any]) -> list[Stage]:
    return [(trades_pixel_loss(settings.pop("mask_ratio"), settings.pop("beta")), settings)]


def _presets(**train_extra: Any) -> dict[str, dict[str, Any]]:
    """MAEP's presets (pairs, model, training) with ``train_extra`` added; no clean->clean mixing, as
    these objectives see clean inputs only where their equation says so."""
    return {name: dict(p, train=dict(p["train"], clean_fraction=0.0, **train_extra))
            for name, p in MAEP_PRESETS.items()}


def _entry(name: str, title: str, stages: Stages, presets: dict[str, dict[str, Any]],
           description: str) -> DefenseEntry:
    return replace(MAEP, name=name, version="1", paper=f"{MAEP.paper} — ablation: {title}",
                   citation=f"{MAEP.citation}, Table 10", train=_train_with(stages), presets=presets,
                   reported=(), description=description)


_MLM_PRESETS = _presets(finetune_epochs=1)
_MLM_PRESETS["paper"]["train"]["finetune_epochs"] = 50

MAEP_MLM = _entry("maep-mlm", "MLM (Eqs. 17-18)", _mlm_stages, _MLM_PRESETS,
                  "MAEP's autoencoder pre-trained by masked reconstruction of adversarial inputs (no "
                  "purification), then briefly fine-tuned with the purification loss at mask ratio 0.")
MAEP_BOTH = _entry("maep-both", "Reconstruction (Eq. 16)", _both_stages, _presets(),
                   "MAEP's autoencoder trained to map both adversarial and clean inputs to the clean image.")
MAEP_TRADES_PIXEL = _entry("maep-trades-pixel", "TRADES in pixel space (Eq. 20)", _trades_stages,
                           _presets(beta=1.0),
                           "MAEP's autoencoder: reconstruct clean inputs, pull purified adversarial "
                           "images toward the purified clean ones (TRADES idea in pixel space).")

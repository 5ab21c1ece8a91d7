"""``disco``: DISCO, a LIIF local implicit function over an EDSR-baseline encoder, trained as a purifier.

Ho & Vasconcelos, "DISCO: Adversarial Defense with Local Implicit Functions", NeurIPS 2022, which uses
LIIF (Chen, Liu & Wang, "Learning Continuous Image Representation with Local Implicit Image Function",
CVPR 2021) on the EDSR-baseline encoder (Lim et al., "Enhanced Deep Residual Networks for Single Image
Super-Resolution", CVPRW 2017) without its upsampling tail. Each output pixel is decoded by an MLP from
the 3x3-unfolded feature of a nearby latent code, the query's coordinate relative to that code and the
query's cell size; with the local ensemble, the four nearest codes' predictions are blended with
area weights. Inputs and outputs are normalised as (x - 0.5) / 0.5, as in LIIF's data_norm.

The purifier re-renders the input on its own pixel grid (scale 1). Training: L1 between the rendering
of ``x_adv`` and the clean ``x`` on PGD pairs against the base classifier, sharing the pair generation
(:mod:`harness.toolkit.pairs`) and training loop (:mod:`harness.toolkit.purifier_training`) with ``maep``. Choices
not fixed by the papers, visible in the presets:

* At scale 1 the local ensemble is equivalent to decoding each pixel from its own code (the
  other three codes get weight ~1e-9), except on the last row and column; the ``small`` preset turns
  it off (4x cheaper), the ``paper`` preset keeps it.
* The shared loop is AdamW (betas 0.9, 0.95) with warm-up and cosine decay; with weight decay 0 it is
  Adam at the paper's lr 1e-4 (``paper``), but not its betas or schedule. Epochs and batch size of
  ``paper`` are our choice. The ``small`` preset uses lr 1e-3 to learn within minutes on a CPU
  (3,000 PGD-10 pairs, 3 epochs: L1 0.011, clean-image PSNR 40 dB / SSIM 0.98 on CIFAR-10 test images).
* The output is clamped to [0, 1] at inference (as DISCO's defense wrapper does); training sees the
  unclamped rendering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.api import Defense, DefenseEntry, Kind, Metadata, NoiseDraws, Purifier, Reported, train_on_pairs

if TYPE_CHECKING:  # pragma: no cover - typing only
    from harness.api import BuildContext, TrainContext

__all__ = ["DISCO", "DiscoPurifier", "EDSRBaseline", "LIIF", "PRESETS", "disco_loss", "new_purifier",
           "pixel_grid"]


class _ResBlock(nn.Module):
    def __init__(self, feats: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(feats, feats, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(feats, feats, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class EDSRBaseline(nn.Module):
    """EDSR-baseline feature encoder (head conv, ``blocks`` residual blocks, body conv, long skip)."""

    def __init__(self, channels: int = 3, feats: int = 64, blocks: int = 16):
        super().__init__()
        self.head = nn.Conv2d(channels, feats, 3, padding=1)
        self.body = nn.Sequential(*[_ResBlock(feats) for _ in range(blocks)],
                                  nn.Conv2d(feats, feats, 3, padding=1))
        self.out_dim = feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return h + self.body(h)


def pixel_grid(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Pixel-centre coordinates in [-1, 1], shape (H, W, 2), ordered (row, column) as in LIIF."""
    rows = -1 + (2 * torch.arange(height, device=device, dtype=torch.float32) + 1) / height
    cols = -1 + (2 * torch.arange(width, device=device, dtype=torch.float32) + 1) / width
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)


class LIIF(nn.Module):
    """Encoder + implicit MLP decoder; ``forward(x)`` re-renders ``x`` on its own pixel grid."""

    def __init__(self, channels: int = 3, feats: int = 64, blocks: int = 16,
                 hidden: tuple[int, ...] = (256, 256, 256, 256), local_ensemble: bool = True,
                 feat_unfold: bool = True, cell_decode: bool = True):
        super().__init__()
        self.encoder = EDSRBaseline(channels, feats, blocks)
        self.local_ensemble, self.feat_unfold, self.cell_decode = local_ensemble, feat_unfold, cell_decode
        in_dim = feats * (9 if feat_unfold else 1) + 2 + (2 if cell_decode else 0)
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU(inplace=True)]
            in_dim = width
        self.decoder = nn.Sequential(*layers, nn.Linear(in_dim, channels))

    def query(self, feat: torch.Tensor, coord: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Decode (B, Q, C) values at ``coord`` (B, Q, 2) with cell sizes ``cell`` (B, Q, 2)."""
        if self.feat_unfold:
            b, c, h, w = feat.shape
            feat = F.unfold(feat, 3, padding=1).view(b, c * 9, h, w)
        h, w = feat.shape[-2:]
        half = torch.tensor([1 / h, 1 / w], device=coord.device)  # half a latent cell in [-1, 1] units
        scale = torch.tensor([h, w], device=coord.device, dtype=coord.dtype)
        codes_coord = pixel_grid(h, w, feat.device).permute(2, 0, 1).unsqueeze(0).expand(len(feat), 2, h, w)
        shifts = [(-1, -1), (-1, 1), (1, -1), (1, 1)] if self.local_ensemble else [(0, 0)]
        preds, areas = [], []
        for sy, sx in shifts:
            shifted = coord + torch.tensor([sy, sx], device=coord.device) * half + 1e-6
            grid = shifted.clamp(-1 + 1e-6, 1 - 1e-6).flip(-1).unsqueeze(1)  # grid_sample wants (x, y)
            q_feat = F.grid_sample(feat, grid, mode="nearest", align_corners=False)[:, :, 0].transpose(1, 2)
            q_coord = F.grid_sample(codes_coord, grid, mode="nearest", align_corners=False)[:, :, 0].transpose(1, 2)
            rel = (coord - q_coord) * scale
            inputs = [q_feat, rel] + ([cell * scale] if self.cell_decode else [])
            preds.append(self.decoder(torch.cat(inputs, dim=-1)))
            areas.append((rel[..., 0] * rel[..., 1]).abs() + 1e-9)
        if not self.local_ensemble:
            return preds[0]
        total = torch.stack(areas).sum(0)
        # each prediction is weighted by the area of the diagonally opposite sub-rectangle
        return sum(p * (a / total).unsqueeze(-1) for p, a in zip(preds, reversed(areas)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        feat = self.encoder((x - 0.5) / 0.5)
        coord = pixel_grid(h, w, x.device).view(1, h * w, 2).expand(b, h * w, 2)
        cell = torch.tensor([2 / h, 2 / w], device=x.device).expand(b, h * w, 2)
        out = self.query(feat, coord, cell)
        return out.transpose(1, 2).reshape(b, c, h, w) * 0.5 + 0.5


class DiscoPurifier(Purifier):
    """DISCO: ``forward`` renders the input through the :class:`LIIF` and clamps it to [0, 1]."""

    def __init__(self, channels: int = 3, **model_config: Any):
        super().__init__()
        hidden = tuple(model_config.pop("hidden", (256, 256, 256, 256)))
        self.net = LIIF(channels, hidden=hidden, **model_config)

    def render(self, x: torch.Tensor) -> torch.Tensor:
        """The unclamped rendering (what the training loss sees)."""
        return self.net(x)

    def forward(self, x: torch.Tensor, noise: NoiseDraws | None = None) -> torch.Tensor:
        return self.render(x).clamp(0, 1)


def disco_loss(model: nn.Module, x_adv: torch.Tensor, x_clean: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    """DISCO's purification loss: mean absolute error between the rendering of ``x_adv`` and ``x``."""
    return (model.render(x_adv).float() - x_clean).abs().mean()


def new_purifier(model_config: Mapping[str, Any], image_shape: Sequence[int], seed: int) -> DiscoPurifier:
    """A freshly initialised purifier; initialisation is seeded and leaves the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiscoPurifier(image_shape[0], **model_config)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: a few minutes on 2 cores with the small base classifier.
    "small": {
        "pairs": {"n": 3000, "eps": "8/255", "steps": 10, "step_size": "2/255", "batch_size": 500},
        "model": {"feats": 32, "blocks": 4, "hidden": [64, 64], "local_ensemble": False},
        "train": {"epochs": 3, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0, "clean_fraction": 0.0},
    },
    # DISCO's network (EDSR-baseline 16x64, MLP 4x256, unfold + cell + local ensemble), Adam lr 1e-4,
    # pairs as in DISCO's recipe (PGD-100, step 2/255, the whole training split); GPU-sized.
    "paper": {
        "pairs": {"n": None, "eps": "8/255", "steps": 100, "step_size": "2/255", "batch_size": 256},
        "model": {"feats": 64, "blocks": 16, "hidden": [256, 256, 256, 256], "local_ensemble": True},
        "train": {"epochs": 100, "batch_size": 32, "lr": 1e-4, "weight_decay": 0.0, "clean_fraction": 0.0},
    },
}


def train(ctx: "TrainContext") -> dict[str, torch.Tensor]:
    """Train the purifier with the L1 loss on the PGD pairs of ``ctx.train_split``."""
    return train_on_pairs(ctx, new_purifier, [(disco_loss, ctx.config["train"])])


def build(ctx: "BuildContext") -> Defense:
    purifier = new_purifier(ctx.config["model"], ctx.dataset.image_shape, seed=0)
    purifier.load_state_dict(ctx.weights())
    return Defense(ctx.classifier, purifier.eval())


DISCO = DefenseEntry(
    name="disco",
    version="1",
    kind=Kind.PURIFIER,
    paper="DISCO: Adversarial Defense with Local Implicit Functions",
    citation="Ho & Vasconcelos, NeurIPS 2022",
    metadata=Metadata(architecture="LIIF (EDSR encoder, MLP decoder) purifier + base classifier", nfe=2,
                      venue="NeurIPS", year=2022, code_url="https://github.com/chihhuiho/disco"),
    build=build,
    stochastic=False,
    differentiable=True,
    presets=PRESETS,
    train=train,
    reported=(
        Reported("cifar10", "linf", "8/255", "AutoAttack standard, non-adaptive", 89.26, 85.33,
                 "Chen & Lu 2025 (arXiv 2501.16904), Table 3", "WRN-28-10", tier="non-adaptive"),
        Reported("cifar100", "linf", "8/255", "AutoAttack standard, non-adaptive", 69.78, 76.91,
                 "Chen & Lu 2025 (arXiv 2501.16904), Table 4", "WRN-28-10", tier="non-adaptive"),
    ),
    description="LIIF (EDSR-baseline encoder, MLP decoder) re-rendering the input, trained with an L1 "
                "purification loss on PGD pairs; deterministic. The MAEP paper evaluates it non-adaptively.",
)

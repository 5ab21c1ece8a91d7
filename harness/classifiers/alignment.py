"""DRA: aligning a classifier's features with a frozen diffusion model's (Huang, Chen & Lin, "Expanding the
Role of Diffusion Models for Robust Classifier Training", arXiv:2602.19931).

The added loss is ``lambda * (1 - cos(h(u), z))``: ``u`` the features of a chosen classifier layer, ``h``
an MLP projection head trained with the classifier, ``z`` the frozen diffusion model's features of the
clean image (computed by the caller, :mod:`harness.toolkit.diffusion.features`). The head is a training
device only: it is not part of the trained classifier. The paper's exact settings could not be read here;
the defaults (penultimate layer, a 2-layer head, lambda 0.5) are reconstructed.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from harness.classifiers.architectures import penultimate_features
from harness.core.errors import UsageError

__all__ = ["DEFAULT_ALIGN", "ProjectionHead", "alignment_loss", "LayerFeatures", "check_align"]

DEFAULT_ALIGN: dict[str, Any] = {
    "lambda": 0.0,  # 0 switches the term off
    "layer": "penultimate",  # or the name of a module of the classifier (its output, globally avg-pooled)
    "head_hidden": 512,  # width of the head's hidden layers
    "head_layers": 2,  # linear layers in the head (1: a linear map)
    "input": "adversarial",  # whose features are aligned: the adversarial or the clean training input
}


def check_align(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` merged into :data:`DEFAULT_ALIGN`, checked."""
    unknown = sorted(set(config) - set(DEFAULT_ALIGN))
    if unknown:
        raise UsageError(f"unknown alignment keys {unknown}; valid: {', '.join(DEFAULT_ALIGN)}")
    cfg = {**DEFAULT_ALIGN, **config}
    if float(cfg["lambda"]) < 0:
        raise UsageError(f"alignment lambda must be at least 0, got {cfg['lambda']}")
    if int(cfg["head_layers"]) < 1 or int(cfg["head_hidden"]) < 1:
        raise UsageError("alignment head_layers and head_hidden must be at least 1")
    if cfg["input"] not in ("adversarial", "clean"):
        raise UsageError(f"alignment input must be adversarial or clean, got {cfg['input']!r}")
    return cfg


def alignment_loss(projected: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * mean(1 - cos(projected, target))`` over the batch: 0 when aligned, ``lam`` when orthogonal."""
    return lam * (1.0 - F.cosine_similarity(projected.float(), target.float(), dim=1, eps=1e-8)).mean()


class ProjectionHead(nn.Module):
    """The MLP ``h``: ``layers`` linear maps with ReLU (and batch norm) between them."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, layers: int = 2):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        modules: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            modules.append(nn.Linear(a, b))
            if i < layers - 1:
                modules += [nn.BatchNorm1d(b), nn.ReLU()]
        self.net = nn.Sequential(*modules)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.net(u)


class LayerFeatures:
    """A forward pass that also returns the features ``u`` of one classifier layer: ``penultimate`` (the
    architecture's ``features``), or a named module's output, globally average-pooled when it is spatial."""

    def __init__(self, model: nn.Module, layer: str):
        self.model, self.layer = model, layer
        if layer != "penultimate":
            modules = dict(model.named_modules())
            if not layer or layer not in modules:
                names = [n for n in modules if n]
                raise UsageError(f"classifier has no layer {layer!r}; valid: penultimate, {', '.join(names)}")
            self.module = modules[layer]
        elif not callable(getattr(model, "classify_features", None)):
            raise UsageError(f"{type(model).__name__} has no features()/classify_features(): name a layer")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer == "penultimate":
            u = penultimate_features(self.model, x)
            return self.model.classify_features(u), u
        captured: list[torch.Tensor] = []
        handle = self.module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        u = captured[0]
        return logits, (u.mean(dim=tuple(range(2, u.dim()))) if u.dim() > 2 else u)

    def dim(self, example: torch.Tensor) -> int:
        """The feature width, from one forward pass on ``example`` (a batch of at least 2, in eval mode)."""
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            _, u = self(example)
        self.model.train(was_training)
        return int(u.shape[1])

"""A third-party classifier entry: its own small network, loaded from the safetensors file named by
``$TINY_NET_WEIGHTS`` (no base classifier, nothing trained by harness)."""

import os

import torch
from safetensors.torch import load_file
from torch import nn

from harness.api import BuildContext, Defense, DefenseEntry, Kind, Metadata, UsageError

WEIGHTS_ENV = "TINY_NET_WEIGHTS"


class TinyNet(nn.Module):
    """Images in [0, 1] -> logits of a linear map of their mean colour."""

    def __init__(self, channels: int = 3, classes: int = 10):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x).flatten(1))


def build(ctx: BuildContext) -> Defense:
    """The network with the weights of ``$TINY_NET_WEIGHTS``."""
    if ctx.classifier is not None:
        raise RuntimeError("tiny-net is a classifier entry but was handed a base classifier")
    path = os.environ.get(WEIGHTS_ENV)
    if not path:
        raise UsageError(f"tiny-net: set ${WEIGHTS_ENV} to its safetensors file")
    network = TinyNet()
    network.load_state_dict(load_file(path))
    return Defense(network)


ENTRY = DefenseEntry(
    name="tiny-net", version="1", kind=Kind.CLASSIFIER,
    paper="A mean-colour linear classifier", citation="Test Plugin 2026",
    build=build, datasets=("cifar10",),
    metadata=Metadata(architecture="global average pool + linear", parameters=40),
)

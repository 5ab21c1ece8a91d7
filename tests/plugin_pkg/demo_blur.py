"""A throwaway third-party defense: a 3x3 box blur in front of the classifier."""

import torch.nn.functional as F

from harness.api import Defense, DefenseEntry, Kind, Purifier, Reported


class Blur(Purifier):
    def forward(self, x, noise):
        return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


ENTRY = DefenseEntry(
    name="demo-blur",
    version="1",
    kind=Kind.PURIFIER,
    paper="<script>alert('plugin')</script> Blur",
    citation="Demo & Plugin 2026",
    build=lambda ctx: Defense(ctx.classifier, Blur()),
    datasets=("cifar10",),
    reported=(Reported("cifar10", "linf", "8/255", "PGD-20", 50.0, 10.0, "made up for a test", tier="adaptive"),),
)

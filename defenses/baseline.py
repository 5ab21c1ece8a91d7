"""``none``: the bare base classifier, no defense (the reference row of every table)."""

from __future__ import annotations

from harness.api import BuildContext, Defense, DefenseEntry, Kind, Metadata, Reported, Role


def build(ctx: BuildContext) -> Defense:
    return Defense(ctx.classifier)


NONE = DefenseEntry(
    name="none",
    version="1",
    kind=Kind.UNDEFENDED,
    role=Role.BASELINE,
    metadata=Metadata(nfe=1),
    paper="No defense: the undefended base classifier",
    citation="-",
    build=build,
    reported=(
        Reported("cifar10", "linf", "8/255", "AutoAttack standard", 94.78, 0.0,
                 "Chen & Lu 2025 (arXiv 2501.16904), Table 3", "WRN-28-10",
                 tier="adaptive"),
        Reported("cifar100", "linf", "8/255", "AutoAttack standard", 81.66, 0.0,
                 "Chen & Lu 2025 (arXiv 2501.16904), Table 4", "WRN-28-10",
                 tier="adaptive"),
    ),
    description="The base classifier alone; robust accuracy should fall to ~0 under any real attack.",
)

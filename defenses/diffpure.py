"""``diffpure``: diffuse the input to t*, then run the reverse process back to t = 0.

Nie et al., "Diffusion Models for Adversarial Purification", ICML 2022. The paper integrates the
VP-SDE (score SDE model, ~100 steps); harness uses the common stand-in, a DDPM UNet with a strided
DDPM (``sampler=ddpm``) or DDIM (``sampler=ddim``) sampler. Options (``--option key=value``, stored in
the cell): ``tstar`` (diffusion time in (0, 1]), ``steps`` (reverse steps), ``sampler``, ``eta``,
``checkpoint`` (gradient checkpointing over reverse steps), ``batch_invariant``, ``unet``
(``hf:<repo id>`` or a ``save_pretrained`` folder instead of harness's own DDPM).
"""

from __future__ import annotations

from harness.api import (DefenseEntry, Kind, Metadata, Reported, ReversePurifier, diffusion_options,
                        entry_build, train_entry_ddpm)


class DiffPure(ReversePurifier):
    """Unguided partial diffusion and reverse sampling (DiffPure)."""


DIFFPURE = DefenseEntry(
    name="diffpure",
    version="1",
    kind=Kind.PURIFIER,
    paper="Diffusion Models for Adversarial Purification",
    citation="Nie, Guo, Huang, Xiao, Vahdat, Anandkumar. ICML 2022. arXiv 2205.07460",
    build=entry_build(DiffPure, ("tstar", "steps")),
    options=diffusion_options(("tstar", "steps")),
    metadata=Metadata(architecture="DDPM UNet purifier + base classifier", nfe=11, venue="ICML", year=2022,
                      code_url="https://github.com/NVlabs/DiffPure"),
    stochastic=True,
    differentiable=True,
    presets={
        "small": {"ddpm": "small", "tstar": 0.1, "steps": 10, "sampler": "ddpm", "checkpoint": True},
        "paper": {"ddpm": "paper", "tstar": 0.1, "steps": 100, "sampler": "ddpm", "checkpoint": True},
        "tiny": {"ddpm": "tiny", "tstar": 0.3, "steps": 3, "sampler": "ddpm", "checkpoint": True},
    },
    train=train_entry_ddpm,
    reported=(
        Reported("cifar10", "linf", "8/255", "AutoAttack rand (EOT 20), adaptive", 89.02, 70.64,
                 "Nie et al. 2022 (arXiv 2205.07460), Table 1", "WRN-28-10", tier="adaptive-eot"),
        Reported("cifar10", "linf", "8/255", "AutoAttack standard, non-adaptive", 88.15, 87.29,
                 "Chen & Lu 2025 (arXiv 2501.16904), Table 3", "WRN-28-10", tier="non-adaptive"),
        Reported("cifar100", "linf", "8/255", "AutoAttack standard, non-adaptive", 61.98, 61.19,
                 "Chen & Lu 2025 (arXiv 2501.16904), Table 4", "WRN-28-10", tier="non-adaptive"),
    ),
    description="Diffuse to t* and denoise with a DDPM/DDIM sampler; exact gradients via checkpointing.",
)

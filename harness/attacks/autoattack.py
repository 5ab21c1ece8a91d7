"""AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020) through the autoattack library (``pyautoattack``).

Versions: ``standard`` (APGD-CE, APGD-T, FAB-T, Square) for deterministic models, ``rand`` (APGD-CE and
APGD-DLR with EOT 20) for stochastic ones, and ``apgd-ce`` alone (the library's ``custom`` version).
AutoAttack re-forms batches as points fall, so a target with fixed per-sample randomness is attacked
one sample at a time, each bound to its own index.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from harness.attacks.base import Attack, Target
from harness.core.registry import suggest
from harness.core.threat import ThreatModel

VERSIONS = ("standard", "rand", "apgd-ce")
_NORMS = {"linf": "Linf", "l2": "L2"}


class _BoundModule(nn.Module):
    """Presents ``target`` to the library as a module of ``x`` alone, for fixed ``indices``."""

    def __init__(self, target: Target, indices: torch.Tensor):
        super().__init__()
        self.target = target
        self.indices = indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices = self.indices if len(self.indices) == len(x) else self.indices[:1].expand(len(x))
        return self.target(x, indices)


class AutoAttackAdapter(Attack):
    name = "autoattack"

    def __init__(self, threat: ThreatModel, version: str = "standard", batch_size: int = 256):
        super().__init__(threat)
        if not isinstance(version, str) or version not in VERSIONS:
            raise ValueError(f"unknown AutoAttack version {version!r}{suggest(str(version), VERSIONS)}; "
                             f"valid: {', '.join(VERSIONS)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        self.version = version
        self.batch_size = batch_size

    def params(self):
        import pyautoattack

        return {"name": self.name, "version": self.version, "norm": self.threat.norm,
                "library": "pyautoattack", "library_version": getattr(pyautoattack, "__version__", "?")}

    def label(self) -> str:
        return "APGD-CE" if self.version == "apgd-ce" else f"AutoAttack ({self.version})"

    def _run(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        from pyautoattack import AutoAttack

        custom = self.version == "apgd-ce"
        attack = AutoAttack(module, norm=_NORMS[self.threat.norm], eps=self.threat.eps.value,
                            seed=seed, version="custom" if custom else self.version,
                            attacks=["apgd-ce"] if custom else None, device=x.device)
        attack.verbose = False
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        with torch.random.fork_rng():  # the library reseeds torch's global RNG
            x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=self.batch_size)
        return x_adv

    def perturb(self, target, x, y, indices, seed):
        if self.threat.eps.value == 0:
            return x.clone()
        if not target.index_dependent:
            return self._run(_BoundModule(target, indices), x, y, seed).detach()
        rows = [self._run(_BoundModule(target, indices[i:i + 1]), x[i:i + 1], y[i:i + 1], seed)
                for i in range(len(x))]
        return torch.cat(rows).detach()

"""AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020) through the autoattack library (``pyautoattack``).

Versions: ``standard`` (APGD-CE, APGD-T, FAB-T, Square) for deterministic models, ``rand`` (APGD-CE and
APGD-DLR with EOT 20) for stochastic ones, and ``plus`` (APGD-CE and APGD-DLR with 5 restarts, FAB,
Square, APGD-T, FAB-T). The version fixes every setting, so it is what the cell records. The single
attacks are in :mod:`harness.attacks.library`.
"""

from __future__ import annotations

from typing import Any

from harness.attacks.library import LibraryAttack
from harness.core.registry import suggest
from harness.core.threat import ThreatModel

__all__ = ["VERSIONS", "AutoAttackAdapter"]

VERSIONS = ("standard", "rand", "plus")


class AutoAttackAdapter(LibraryAttack):
    """The AutoAttack ensemble of one ``version``."""

    name = "autoattack"
    summary = "AutoAttack through the autoattack library: autoattack[:version=standard|rand|plus]"

    def __init__(self, threat: ThreatModel, version: str = "standard", batch_size: int = 256):
        super().__init__(threat, batch_size)
        if not isinstance(version, str) or version not in VERSIONS:
            raise ValueError(f"unknown AutoAttack version {version!r}{suggest(str(version), VERSIONS)}; "
                             f"valid: {', '.join(VERSIONS)}")
        self.version = version

    def settings(self) -> dict[str, Any]:
        return {"version": self.version}

    def label(self) -> str:
        return f"AutoAttack ({self.version})"

    def library_arguments(self) -> dict[str, Any]:
        return {"version": self.version}

"""How a cell's networks compute: channels-last memory format and bfloat16 autocast (``harness run
--channels-last``, ``--autocast bf16``).

Both are off by default, and a cell records them (``precision`` in its key) only when on, so the keys of
float32 cells do not change. They wrap the defense's classifier and purifier, so everything the cell
evaluates (the clean pass, every attack iteration, the final evaluation) runs in them; outputs are cast
back to float32, so losses, projections and the stored numbers stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.core.entry import Defense, Identity
from harness.core.errors import UsageError

__all__ = ["AUTOCAST", "Precision"]

#: ``--autocast`` values and their dtypes
AUTOCAST = {"bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """``channels_last`` inputs and an ``autocast`` dtype (a key of :data:`AUTOCAST`, or None)."""

    channels_last: bool = False
    autocast: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.channels_last, bool):
            raise UsageError(f"--channels-last is a flag (true or false), got {self.channels_last!r}")
        if self.autocast is not None and self.autocast not in AUTOCAST:
            raise UsageError(f"unknown --autocast {self.autocast!r}; valid: {', '.join(AUTOCAST)}")

    @property
    def default(self) -> bool:
        return not self.channels_last and self.autocast is None

    def describe(self) -> dict[str, Any]:
        """What a cell's key records: only the settings that are on."""
        return {**({"channels_last": True} if self.channels_last else {}),
                **({"autocast": self.autocast} if self.autocast else {})}

    def apply(self, defense: Defense) -> Defense:
        """``defense`` with its classifier and purifier run in this precision (itself when default)."""
        if self.default:
            return defense
        purifier = defense.purifier if isinstance(defense.purifier, Identity) else _Precise(defense.purifier, self)
        return Defense(_Precise(defense.classifier, self), purifier).train(defense.training)


class _Precise(nn.Module):
    """``module`` called on a channels-last input under autocast, its floating output back in float32."""

    def __init__(self, module: nn.Module, precision: Precision):
        super().__init__()
        self.module, self.precision = module, precision

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        if self.precision.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = AUTOCAST.get(self.precision.autocast or "")
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            out = self.module(x, *args)
        return out.float().contiguous() if out.is_floating_point() else out

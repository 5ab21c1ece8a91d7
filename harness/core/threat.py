"""Threat models: the norm and the radius, with epsilon accepted as ``8/255`` or ``0.0314``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from harness.core.errors import UsageError
from harness.core.registry import suggest

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class Epsilon:
    """A perturbation radius: its float value and the text it was given as."""

    value: float
    text: str

    @classmethod
    def parse(cls, text: str | float) -> "Epsilon":
        """``8/255``, ``0.0314`` or a float; a :class:`UsageError` for anything else."""
        raw = str(text).strip()
        try:
            value = float(Fraction(raw)) if "/" in raw else float(raw)
        except ZeroDivisionError:
            raise UsageError(f"epsilon {raw!r} divides by zero; write it as a fraction like 8/255 "
                             f"or a number like 0.0314") from None
        except (ValueError, OverflowError):
            raise UsageError(f"cannot read epsilon {raw!r}; write it as a fraction like 8/255 "
                             f"or a number like 0.0314") from None
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"epsilon must be a finite number >= 0 (like 8/255), got {raw!r}")
        return cls(value, raw)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class ThreatModel:
    norm: str
    eps: Epsilon

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise UsageError(f"unknown threat model {self.norm!r}{suggest(str(self.norm), NORMS)}; "
                             f"valid: {', '.join(NORMS)}")
        if self.norm == "linf" and self.eps.value > 1:
            raise UsageError(f"linf epsilon {self.eps} is above 1, the whole [0, 1] pixel range; "
                             f"valid: 0 to 1 (e.g. 8/255)")

    def check_image_shape(self, shape: tuple[int, ...], dataset: str) -> None:
        """A :class:`UsageError` if no two images of ``shape`` are ``eps`` apart: for l2, an ``eps``
        above the diameter ``sqrt(C*H*W)`` of the [0, 1] image cube (linf is bounded by 1 anyway)."""
        diameter = math.sqrt(math.prod(shape))
        if self.norm == "l2" and self.eps.value > diameter:
            raise UsageError(f"l2 epsilon {self.eps} is above {diameter:.4g}, the diameter "
                             f"sqrt({'*'.join(map(str, shape))}) of the [0, 1] image cube of {dataset}; "
                             f"valid: 0 to {diameter:.4g}")

    def describe(self) -> dict[str, object]:
        return {"norm": self.norm, "eps": self.eps.value, "eps_text": self.eps.text}

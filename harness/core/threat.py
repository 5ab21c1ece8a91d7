"""Threat models: the norm and the radius, with epsilon accepted as ``8/255`` or ``0.0314``."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from harness.core.errors import UsageError

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class Epsilon:
    """A perturbation radius: its float value and the text it was given as."""

    value: float
    text: str

    @classmethod
    def parse(cls, text: str | float) -> "Epsilon":
        raw = str(text).strip()
        try:
            value = float(Fraction(raw)) if "/" in raw else float(raw)
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"cannot read epsilon {raw!r}; write it as a fraction like 8/255 "
                             f"or a number like 0.0314") from None
        if not value >= 0 or value == float("inf"):
            raise UsageError(f"epsilon must be a finite number >= 0, got {raw!r}")
        return cls(value, raw)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class ThreatModel:
    norm: str
    eps: Epsilon

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise UsageError(f"unknown threat model {self.norm!r}; valid: {', '.join(NORMS)}")

    def describe(self) -> dict[str, object]:
        return {"norm": self.norm, "eps": self.eps.value, "eps_text": self.eps.text}

"""The defense-entry contract and its registry.

A defense entry is data plus factories. Entries (first-party ones included) are discovered through the
``harness.defenses`` entry-point group: each entry point names a :class:`DefenseEntry` object, or a
zero-argument callable returning one. See the Python Packaging Guide, "Creating and discovering
plugins".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from harness.data.catalog import dataset_names
from harness.errors import UsageError
from harness.noise import NoiseDraws

if TYPE_CHECKING:  # pragma: no cover - typing only
    from harness.context import BuildContext, TrainContext

__all__ = ["Kind", "Reported", "DefenseEntry", "Defense", "Purifier", "Registry", "default_registry"]

ENTRY_POINT_GROUP = "harness.defenses"
log = logging.getLogger(__name__)


class Kind(str, Enum):
    """What a defense entry is."""

    PURIFIER = "purifier"  # preprocesses inputs of a base classifier
    CLASSIFIER = "classifier"  # a (robustly trained or bare) classifier, no preprocessing


@dataclass(frozen=True)
class Reported:
    """A number a paper reports for an entry (shown only in columns labelled "reported")."""

    dataset: str
    threat: str  # "linf" | "l2"
    eps: str  # as text, e.g. "8/255"
    attack: str  # e.g. "AutoAttack standard"
    clean: float | None
    robust: float | None
    source: str  # citation and table
    classifier: str = ""


class Purifier(nn.Module):
    """Maps images in [0, 1] to purified images in [0, 1]; draws all randomness from ``noise``."""

    def forward(self, x: torch.Tensor, noise: NoiseDraws) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class Identity(Purifier):
    """No purification."""

    def forward(self, x, noise):
        return x


class Defense(nn.Module):
    """A base classifier behind an optional purifier: ``logits = classifier(purifier(x, noise))``."""

    def __init__(self, classifier: nn.Module, purifier: Purifier | None = None):
        super().__init__()
        self.classifier = classifier
        self.purifier = purifier if purifier is not None else Identity()

    def purify(self, x: torch.Tensor, noise: NoiseDraws) -> torch.Tensor:
        return self.purifier(x, noise)

    def forward(self, x: torch.Tensor, noise: NoiseDraws) -> torch.Tensor:
        return self.classifier(self.purify(x, noise))


@dataclass(frozen=True)
class DefenseEntry:
    """Everything harness needs to know about one defense.

    ``build(ctx)`` returns a :class:`Defense` in eval mode; ``train(ctx)`` produces the entry's own
    weights (a state dict) for ``ctx.config``, one of ``presets``. Bump ``version`` whenever a change
    invalidates stored results: it is part of every cell key and artifact recipe.
    """

    name: str
    version: str
    kind: Kind
    paper: str
    citation: str
    build: Callable[["BuildContext"], Defense]
    datasets: tuple[str, ...] = ()  # the datasets it supports; empty: every dataset harness knows
    stochastic: bool = False
    differentiable: bool = True
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    train: Callable[["TrainContext"], dict[str, torch.Tensor]] | None = None
    reported: tuple[Reported, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"defense name must be alphanumeric with - or _, got {self.name!r}")
        if self.train is not None and not self.presets:
            raise ValueError(f"defense {self.name!r} has a train recipe but no presets")

    @property
    def default_preset(self) -> str | None:
        """``small`` if the entry has it (the CPU-sized preset), else its first preset."""
        if not self.presets:
            return None
        return "small" if "small" in self.presets else next(iter(self.presets))

    def supported_datasets(self) -> tuple[str, ...]:
        return self.datasets or tuple(dataset_names())

    def check_dataset(self, dataset: str, role: str = "evaluated on") -> None:
        """UsageError naming the valid datasets if this entry cannot be ``role`` ``dataset``."""
        if dataset not in self.supported_datasets():
            raise UsageError(f"defense {self.name!r} cannot be {role} {dataset!r}; "
                             f"valid: {', '.join(self.supported_datasets())}")

    def preset_config(self, preset: str | None) -> dict[str, Any]:
        if not self.presets:
            return {}
        preset = preset or self.default_preset
        if preset not in self.presets:
            raise UsageError(f"defense {self.name!r} has no preset {preset!r}; "
                             f"valid: {', '.join(self.presets)}")
        return dict(self.presets[preset])


class Registry:
    """Named defense entries; rejects duplicates and lists valid names on a miss."""

    def __init__(self) -> None:
        self._entries: dict[str, DefenseEntry] = {}

    def register(self, entry: DefenseEntry) -> DefenseEntry:
        if not isinstance(entry, DefenseEntry):
            raise TypeError(f"expected a DefenseEntry, got {type(entry).__name__}")
        if entry.name in self._entries and self._entries[entry.name] is not entry:
            raise ValueError(f"defense {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Import every entry point of ``group`` and register what it names."""
        for ep in entry_points(group=group):
            try:
                obj = ep.load()
                entry = obj() if callable(obj) and not isinstance(obj, DefenseEntry) else obj
            except Exception as exc:  # a broken plugin must not hide the others
                log.warning("could not load defense plugin %r (%s): %s", ep.name, ep.value, exc)
                continue
            if entry.name != ep.name:
                log.warning("entry point %r names defense %r; registering as %r", ep.name,
                            entry.name, entry.name)
            self.register(entry)

    def get(self, name: str) -> DefenseEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise UsageError(f"unknown defense {name!r}; valid: {', '.join(self.names()) or '(none)'}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[DefenseEntry]:
        return [self._entries[n] for n in self.names()]


_default: Registry | None = None


def default_registry(reload: bool = False) -> Registry:
    """The registry of every installed entry (loaded lazily from entry points)."""
    global _default
    if _default is None or reload:
        registry = Registry()
        registry.load_entry_points()
        _default = registry
    return _default

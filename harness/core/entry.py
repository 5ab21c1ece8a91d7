"""The defense-entry contract: what a defense is, what it declares, and the model harness evaluates.

A :class:`DefenseEntry` is data plus factories. Its :class:`Kind` says where its network comes from:

* ``purifier``: a :class:`Purifier` in front of the run's base classifier (``ctx.classifier``);
* ``classifier``: a classifier of its own (robustly trained, or an external checkpoint), trained through
  ``ctx.weights()`` or loaded by its own code; no base classifier is loaded for it;
* ``undefended``: the run's base classifier itself, with no defense.

Entries (first-party ones included) are discovered through the ``harness.defenses`` entry-point group
by :func:`defense_registry`; each entry point names a :class:`DefenseEntry`, or a zero-argument callable
returning one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from harness.core.errors import UsageError
from harness.core.noise import NoiseDraws
from harness.core.registry import Registry, suggest

if TYPE_CHECKING:  # pragma: no cover - typing only
    from harness.core.context import BuildContext, TrainContext

__all__ = ["Kind", "Role", "Option", "ExtraData", "Metadata", "Reported", "DefenseEntry", "Defense", "Purifier",
           "Identity", "defense_registry", "registry_of", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "harness.defenses"
OPTION_TYPES = (int, float, bool, str)


class Kind(str, Enum):
    """Where an entry's network comes from."""

    PURIFIER = "purifier"  # preprocesses the inputs of the run's base classifier
    CLASSIFIER = "classifier"  # a classifier of its own; no base classifier
    UNDEFENDED = "undefended"  # the run's base classifier itself


class Role(str, Enum):
    """What an entry is for in a comparison."""

    DEFENSE = "defense"
    BASELINE = "baseline"  # the reference a defense's gain is measured against (e.g. no defense)


@dataclass(frozen=True)
class Option:
    """A ``--option name=value`` an entry accepts. ``default=None``: the preset's value of ``name``."""

    name: str
    type: type
    help: str
    default: Any = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in OPTION_TYPES:
            raise ValueError(f"option {self.name!r}: type must be one of int, float, bool, str")

    def validate(self, entry: str, value: Any) -> Any:
        """``value`` if it is a valid value of this option, else a :class:`UsageError`."""
        ok = isinstance(value, self.type) and not (self.type is int and isinstance(value, bool))
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise UsageError(f"option {self.name!r} of defense {entry!r} must be a {self.type.__name__}, "
                             f"got {value!r}")
        if self.choices and value not in self.choices:
            raise UsageError(f"option {self.name!r} of defense {entry!r} must be one of "
                             f"{', '.join(map(str, self.choices))}, got {value!r}")
        return value

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type.__name__, "default": self.default, "help": self.help,
                "choices": list(self.choices)}


@dataclass(frozen=True)
class ExtraData:
    """Training data beyond the dataset's own training split (RobustBench's "extra data")."""

    kind: str  # e.g. "synthetic" or "external"
    size: int  # number of images
    source: str = ""  # e.g. the generator


@dataclass(frozen=True)
class Metadata:
    """A model card, as RobustBench keeps for its models. ``nfe``: network forward passes per prediction
    (e.g. diffusion steps times UNet calls), at the default preset."""

    architecture: str = ""
    parameters: int | None = None
    extra_data: ExtraData | None = None
    nfe: int | None = None
    venue: str = ""
    year: int | None = None
    code_url: str = ""

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Reported:
    """A number a paper reports for an entry, shown only in columns labelled "reported".

    ``clean`` and ``robust`` are in ``unit`` (percent); ``tier`` names the protocol they were measured
    under (``non-adaptive``, ``adaptive``, ``bpda`` or ``adaptive-eot``) and ``variant`` the test set
    (``clean``, or a variant such as ``colored``), so a report places them beside cells of that protocol
    and variant only.
    """

    dataset: str
    threat: str  # "linf" | "l2"
    eps: str  # as text, e.g. "8/255"
    attack: str  # e.g. "AutoAttack standard"
    clean: float | None
    robust: float | None
    source: str  # citation and table
    classifier: str = ""
    tier: str = field(default="", kw_only=True)
    variant: str = field(default="clean", kw_only=True)
    unit: str = field(default="percent", kw_only=True)

    def __post_init__(self) -> None:
        if not self.tier:
            raise ValueError(f"reported number ({self.source}) must name its protocol tier")
        if self.unit != "percent":
            raise ValueError(f"reported number ({self.source}): unit must be 'percent'")

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Purifier(nn.Module):
    """Maps images in [0, 1] to purified images in [0, 1]; draws all randomness from ``noise``."""

    def forward(self, x: torch.Tensor, noise: NoiseDraws) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class Identity(Purifier):
    """No purification."""

    def forward(self, x, noise):
        return x


class Defense(nn.Module):
    """A classifier behind an optional purifier: ``logits = classifier(purifier(x, noise))``."""

    def __init__(self, classifier: nn.Module, purifier: Purifier | None = None):
        super().__init__()
        self.classifier = classifier
        self.purifier = purifier if purifier is not None else Identity()

    @property
    def has_purifier(self) -> bool:
        return not isinstance(self.purifier, Identity)

    def purify(self, x: torch.Tensor, noise: NoiseDraws) -> torch.Tensor:
        return self.purifier(x, noise)

    def forward(self, x: torch.Tensor, noise: NoiseDraws) -> torch.Tensor:
        return self.classifier(self.purify(x, noise))


def _preset_dict(name: str, preset: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(preset) and not isinstance(preset, type):
        return dataclasses.asdict(preset)
    if isinstance(preset, Mapping):
        return dict(preset)
    raise TypeError(f"preset {name!r} must be a frozen dataclass or a mapping, got {type(preset).__name__}")


def _check_presets(entry: str, presets: Mapping[str, Any]) -> None:
    """Every preset of an entry has the same fields (nested mappings included), each of one type
    (``None`` fits any; ints and floats mix): a typo in one preset fails here, at registration, not
    halfway through training."""
    configs = {name: _preset_dict(name, p) for name, p in presets.items()}
    if configs:
        first = next(iter(configs))
        for name, config in configs.items():
            _same_shape(entry, f"preset {name!r}", config, f"preset {first!r}", configs[first], "")


def _same_shape(entry: str, this: str, a: Mapping[str, Any], that: str, b: Mapping[str, Any], where: str) -> None:
    missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    if missing or extra:
        raise ValueError(f"defense {entry!r}: {this} differs from {that}{where} in its fields "
                         f"(missing: {', '.join(missing) or '-'}; unknown: {', '.join(extra) or '-'})")
    for key, value in a.items():
        other = b[key]
        if isinstance(value, Mapping) and isinstance(other, Mapping):
            _same_shape(entry, this, value, that, other, f"{where}.{key}" if where else f" at {key!r}")
        elif value is not None and other is not None and _kind(value) != _kind(other):
            raise ValueError(f"defense {entry!r}: field {key!r}{where} is a {type(value).__name__} in {this} "
                             f"but a {type(other).__name__} in {that}")


def _kind(value: Any) -> str:
    """A value's type for preset checks: ints and floats are both numbers."""
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, (int, float)) else type(value).__name__


@dataclass(frozen=True)
class DefenseEntry:
    """Everything harness needs to know about one defense.

    ``build(ctx)`` returns a :class:`Defense`; ``train(ctx)`` produces the entry's own weights (a state
    dict) for ``ctx.config``, one of ``presets`` (frozen dataclasses or mappings with the same fields).
    ``options`` are the ``--option`` values it accepts. Bump ``version`` whenever a change invalidates
    stored results: it is part of every cell key and artifact recipe.
    """

    name: str
    version: str
    kind: Kind
    paper: str  # the paper's title
    citation: str  # authors, venue and year, arXiv id
    build: Callable[["BuildContext"], Defense]
    datasets: tuple[str, ...] = ()  # the datasets it supports; empty: every dataset harness knows
    stochastic: bool = False
    differentiable: bool = True
    presets: Mapping[str, Any] = field(default_factory=dict)
    train: Callable[["TrainContext"], dict[str, torch.Tensor]] | None = None
    options: tuple[Option, ...] = ()
    metadata: Metadata = field(default_factory=Metadata)
    reported: tuple[Reported, ...] = ()
    role: Role = Role.DEFENSE
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"defense name must be alphanumeric with - or _, got {self.name!r}")
        if not isinstance(self.kind, Kind):
            raise ValueError(f"defense {self.name!r}: kind must be a harness Kind, got {self.kind!r}")
        if self.train is not None and not self.presets:
            raise ValueError(f"defense {self.name!r} has a train recipe but no presets")
        _check_presets(self.name, self.presets)
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"defense {self.name!r} declares an option twice")
        for item in self.reported:
            if not isinstance(item, Reported):
                raise TypeError(f"defense {self.name!r}: reported numbers must be harness Reported")

    @property
    def uses_base_classifier(self) -> bool:
        """Whether the entry needs the run's base classifier (purifiers, and the undefended entry)."""
        return self.kind is not Kind.CLASSIFIER

    @property
    def default_preset(self) -> str | None:
        """``small`` if the entry has it (the CPU-sized preset), else its first preset."""
        if not self.presets:
            return None
        return "small" if "small" in self.presets else next(iter(self.presets))

    def supports(self, dataset: str) -> bool:
        return not self.datasets or dataset in self.datasets

    def check_dataset(self, dataset: str, role: str = "evaluated on") -> None:
        """UsageError naming the valid datasets if this entry cannot be ``role`` ``dataset``."""
        if not self.supports(dataset):
            raise UsageError(f"defense {self.name!r} cannot be {role} {dataset!r}; "
                             f"valid: {', '.join(self.datasets)}")

    def resolve_preset(self, preset: str | None) -> str | None:
        """The preset to use: ``preset`` (checked), else the default; ``None`` for an entry without any."""
        if not self.presets:
            return None
        if preset is not None and preset not in self.presets:
            raise UsageError(f"defense {self.name!r} has no preset {preset!r}{suggest(preset, self.presets)}; "
                             f"valid: {', '.join(self.presets)}")
        return preset or self.default_preset

    def preset_config(self, preset: str | None) -> dict[str, Any]:
        name = self.resolve_preset(preset)
        return {} if name is None else _preset_dict(name, self.presets[name])

    def select_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The values of ``options`` that this entry declares, each validated."""
        declared = {o.name: o for o in self.options}
        return {k: declared[k].validate(self.name, v) for k, v in options.items() if k in declared}

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` validated: an undeclared name is a UsageError listing the declared ones."""
        declared = [o.name for o in self.options]
        for key in options:
            if key not in declared:
                raise UsageError(f"defense {self.name!r} has no option {key!r}{suggest(key, declared)}; "
                                 f"valid: {', '.join(declared) or '(none)'}")
        return self.select_options(options)

    def describe(self) -> dict[str, Any]:
        """The entry's metadata as stored with every cell (not part of the cell key)."""
        return {"name": self.name, "version": self.version, "kind": self.kind.value, "role": self.role.value,
                "paper": self.paper, "citation": self.citation, "stochastic": self.stochastic,
                "differentiable": self.differentiable, "metadata": self.metadata.describe(),
                "options": [o.describe() for o in self.options],
                "reported": [r.describe() for r in self.reported]}


def _describe_entry(entry: DefenseEntry) -> tuple[str, str]:
    return entry.description, f"{entry.paper} ({entry.citation})" if entry.citation not in ("", "-") else entry.paper


def _new_registry(group: str | None) -> Registry[DefenseEntry]:
    return Registry("defense", group=group, expects=DefenseEntry, describe=_describe_entry,
                    name_of=lambda e: e.name)


def registry_of(*entries: DefenseEntry) -> Registry[DefenseEntry]:
    """A registry of exactly ``entries`` (no plugins), e.g. to run entries that are not installed."""
    registry = _new_registry(None)
    for entry in entries:
        registry.add(entry.name, entry)
    return registry


_defenses: Registry[DefenseEntry] | None = None


def defense_registry(reload: bool = False) -> Registry[DefenseEntry]:
    """The registry of every installed defense entry (plugins imported on first use)."""
    global _defenses
    if _defenses is None or reload:
        _defenses = _new_registry(ENTRY_POINT_GROUP)
    return _defenses

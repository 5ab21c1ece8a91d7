"""One registry mechanism for every axis: defenses, attacks, protocols, architectures, dataset formats,
variants and classifier sources.

A :class:`Registry` holds named values of one axis. Built-in values are added in code; third parties add
values through the axis' entry-point group (Python Packaging Guide, "Creating and discovering plugins";
lm-evaluation-harness registers tasks the same way). Plugins are loaded lazily, one at a time, when a
command needs them, and in isolation: a plugin that fails to import, names the wrong type or repeats a
name is kept as a :class:`PluginError` (``harness list`` shows it) while every other value still loads.
A miss lists the valid names and suggests the closest one.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Callable, Generic, Iterable, TypeVar

from harness.core.errors import UsageError

__all__ = ["Registered", "PluginError", "Registry", "suggest"]

T = TypeVar("T")
log = logging.getLogger(__name__)
BUILT_IN = "built-in"


@dataclass(frozen=True)
class Registered(Generic[T]):
    """A value of an axis, with its one-line summary, its paper and where it came from."""

    name: str
    value: T
    summary: str = ""
    paper: str = ""
    #: ``built-in``, or the plugin's distribution as ``name==version``
    source: str = BUILT_IN
    distribution: str = ""
    distribution_version: str = ""


@dataclass(frozen=True)
class PluginError:
    """A plugin that could not be registered, and why."""

    name: str
    source: str
    error: str


def suggest(name: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``valid``, or nothing."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _distribution(point: EntryPoint) -> tuple[str, str]:
    dist = getattr(point, "dist", None)
    if dist is None:
        return "", ""
    return dist.metadata["Name"] or "", dist.version or ""


class Registry(Generic[T]):
    """Named values of one ``axis`` (``"defense"``, ``"attack"``, ...), from code and from ``group``.

    ``expects`` is the type (or types) a value must have; ``describe(value)`` gives its ``(summary,
    paper)`` and ``name_of(value)`` the name the value itself declares (checked against the entry point's
    name), for values that carry them. Values of the distribution ``owner`` (harness itself) win a name
    clash with any plugin.
    """

    def __init__(self, axis: str, *, group: str | None = None, expects: type | tuple[type, ...] = object,
                 describe: Callable[[T], tuple[str, str]] | None = None,
                 name_of: Callable[[T], str] | None = None, owner: str = "harness"):
        self.axis = axis
        self.group = group
        self.expects = expects
        self._describe = describe
        self._name_of = name_of
        self._owner = owner
        self._values: dict[str, Registered[T]] = {}
        self._pending: dict[str, EntryPoint] | None = None  # discovered, not yet imported
        self._errors: dict[str, PluginError] = {}

    # -- adding values -----------------------------------------------------------------------------
    def add(self, name: str, value: T, *, summary: str = "", paper: str = "", source: str = BUILT_IN,
            distribution: str = "", distribution_version: str = "") -> T:
        """Register ``value`` under ``name``; a second value under a taken name is an error."""
        self._check(name, value)
        taken = self._values.get(name)
        if taken is not None and taken.value is not value:
            raise ValueError(f"{self.axis} {name!r} is registered twice ({taken.source} and {source})")
        if self._describe is not None and not (summary or paper):
            summary, paper = self._describe(value)
        self._values[name] = Registered(name, value, summary, paper, source, distribution,
                                        distribution_version)
        return value

    def register(self, name: str, *, summary: str = "", paper: str = "") -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        def decorate(value: T) -> T:
            return self.add(name, value, summary=summary, paper=paper)
        return decorate

    def _check(self, name: str, value: T) -> None:
        if not isinstance(value, self.expects):
            kinds = self.expects if isinstance(self.expects, tuple) else (self.expects,)
            raise TypeError(f"{self.axis} {name!r} must be a {' or '.join(k.__name__ for k in kinds)}, "
                            f"got {type(value).__name__}")
        declared = self._name_of(value) if self._name_of is not None else name
        if declared != name:
            raise ValueError(f"entry point {name!r} names {self.axis} {declared!r}")

    # -- plugins ------------------------------------------------------------------------------------
    def _discover(self) -> dict[str, EntryPoint]:
        """The group's entry points by name (nothing imported yet); clashes resolved once, here."""
        if self._pending is None:
            self._pending = {}
            points = list(entry_points(group=self.group)) if self.group else []
            # harness's own values first, then plugins in a fixed order: the first of a name wins
            points.sort(key=lambda p: (_distribution(p)[0] != self._owner, _distribution(p)[0], p.value))
            for point in points:
                dist, version = _distribution(point)
                source = f"{dist}=={version}" if dist else point.value
                if point.name in self._values or point.name in self._pending:
                    other = (self._values[point.name].source if point.name in self._values
                             else self._source(self._pending[point.name]))
                    self._errors.setdefault(f"{point.name} ({source})", PluginError(
                        point.name, source, f"duplicate {self.axis} name {point.name!r}: already "
                                            f"provided by {other}"))
                    continue
                self._pending[point.name] = point
        return self._pending

    @staticmethod
    def _source(point: EntryPoint) -> str:
        dist, version = _distribution(point)
        return f"{dist}=={version}" if dist else point.value

    def _load(self, name: str) -> None:
        """Import the pending entry point ``name``; record a failure instead of raising."""
        point = self._discover().pop(name, None)
        if point is None:
            return
        dist, version = _distribution(point)
        source = self._source(point)
        try:
            obj = point.load()
            value = obj() if callable(obj) and not isinstance(obj, self.expects) else obj
            self.add(name, value, source=source, distribution=dist, distribution_version=version)
        except Exception as exc:  # a broken plugin must not hide the others
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("could not load %s plugin %r (%s): %s", self.axis, name, point.value, message)
            self._errors[name] = PluginError(name, source, message)

    # -- reading ------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every usable name, without importing plugins that are not loaded yet."""
        return sorted(set(self._values) | set(self._discover()))

    def get(self, name: str) -> T:
        return self.info(name).value

    def info(self, name: str) -> Registered[T]:
        """The registered value ``name`` with its description; a miss is a :class:`UsageError`."""
        self._load(name)
        if name in self._values:
            return self._values[name]
        if name in self._errors:
            raise UsageError(f"{self.axis} {name!r} could not be loaded: {self._errors[name].error}")
        valid = self.names()
        raise UsageError(f"unknown {self.axis} {name!r}{suggest(name, valid)}; "
                         f"valid: {', '.join(valid) or '(none)'}")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def items(self) -> list[Registered[T]]:
        """Every value, plugins imported now, in name order."""
        for name in list(self._discover()):
            self._load(name)
        return [self._values[n] for n in sorted(self._values)]

    def errors(self) -> list[PluginError]:
        """The plugins that could not be registered (after :meth:`items`, all of them)."""
        return [self._errors[k] for k in sorted(self._errors)]

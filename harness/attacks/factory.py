"""Attacks by name, with their options: the one place the CLI and the runner turn specs into attacks."""

from __future__ import annotations

from typing import Any, Mapping

from harness.attacks.autoattack import AutoAttackAdapter
from harness.attacks.base import Attack
from harness.attacks.pgd import PGD
from harness.errors import UsageError
from harness.threat import ThreatModel

ATTACKS = ("pgd", "autoattack", "apgd-ce")


def parse_attack_spec(spec: str) -> dict[str, Any]:
    """``pgd``, ``pgd:steps=50,eot=4``, ``autoattack:version=rand``, ``apgd-ce`` -> a params dict."""
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name not in ATTACKS:
        raise UsageError(f"unknown attack {name!r}; valid: {', '.join(ATTACKS)}")
    params: dict[str, Any] = {"name": name}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"attack option {item!r} must look like key=value")
        params[key.strip()] = coerce_value(value.strip())
    return params


def coerce_value(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def build_attack(params: Mapping[str, Any], threat: ThreatModel) -> Attack:
    options = dict(params)
    name = options.pop("name")
    try:
        if name == "pgd":
            return PGD(threat, **options)
        if name == "autoattack":
            return AutoAttackAdapter(threat, **options)
        if name == "apgd-ce":
            return AutoAttackAdapter(threat, version="apgd-ce", **options)
    except TypeError as exc:
        raise UsageError(f"bad options for attack {name!r}: {exc}") from None
    raise UsageError(f"unknown attack {name!r}; valid: {', '.join(ATTACKS)}")

"""The registry of attacks, and the parsing of attack specs: the one place specs become attacks.

A spec is ``NAME[:key=value,...]`` (``pgd:steps=50,eot=4``). Third parties add attacks through the
``harness.attacks`` entry-point group: each entry point names a callable ``(threat, **options) ->
Attack`` (typically an :class:`~harness.attacks.base.Attack` subclass), with optional ``summary`` and
``paper`` attributes for ``harness list --attacks``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from harness.attacks.autoattack import AutoAttackAdapter
from harness.attacks.base import Attack
from harness.attacks.library import APGDCE, APGDDLR, APGDT, FABT, Square
from harness.attacks.pgd import PGD
from harness.attacks.transfer import TransferAttack
from harness.core.errors import UsageError
from harness.core.registry import Registry, suggest
from harness.core.threat import ThreatModel

__all__ = ["ATTACK_GROUP", "AttackFactory", "attack_registry", "parse_attack_spec", "coerce_value", "build_attack"]

ATTACK_GROUP = "harness.attacks"
AttackFactory = Callable[..., Attack]


def _describe(factory: AttackFactory) -> tuple[str, str]:
    doc = (getattr(factory, "__doc__", "") or "").strip().splitlines()
    return getattr(factory, "summary", "") or (doc[0] if doc else ""), getattr(factory, "paper", "")


_registry: Registry[AttackFactory] | None = None


def attack_registry() -> Registry[AttackFactory]:
    """Every attack: harness's own, then plugins of the ``harness.attacks`` group (imported on use)."""
    global _registry
    if _registry is None:
        registry: Registry[AttackFactory] = Registry("attack", group=ATTACK_GROUP, describe=_describe)
        registry.add("pgd", PGD, summary="PGD, l_inf or l_2, random start, EOT: "
                     "pgd[:steps=N,step_size=S,eot=K,random_start=true]",
                     paper="Madry et al., ICLR 2018; EOT: Athalye et al., ICML 2018")
        registry.add("autoattack", AutoAttackAdapter, summary=AutoAttackAdapter.summary,
                     paper=AutoAttackAdapter.paper)
        for attack in (APGDCE, APGDDLR, APGDT, FABT, Square):
            registry.add(attack.name, attack, summary=attack.summary, paper=attack.paper)
        registry.add(TransferAttack.name, TransferAttack, summary=TransferAttack.summary,
                     paper=TransferAttack.paper)
        _registry = registry
    return _registry


def parse_attack_spec(spec: str) -> dict[str, Any]:
    """``pgd``, ``pgd:steps=50,eot=4``, ``autoattack:version=rand``, ``apgd-ce`` -> a params dict."""
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    attack_registry().info(name)  # an unknown name lists the valid ones
    params: dict[str, Any] = {"name": name}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"attack option {item!r} must look like key=value")
        params[key.strip()] = coerce_value(value.strip())
    return params


def coerce_value(value: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True; anything else stays text."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def build_attack(params: Mapping[str, Any], threat: ThreatModel) -> Attack:
    """The attack named by ``params["name"]`` with the other params as options; an unknown name, an
    option the attack does not take or a bad value is a :class:`UsageError` naming the valid ones."""
    options = dict(params)
    name = options.pop("name", None)
    registry = attack_registry()
    if not isinstance(name, str):
        raise UsageError(f"an attack spec must name its attack (got {name!r}); valid: {', '.join(registry.names())}")
    factory = registry.get(name)
    # the keyword options after the threat model; a factory taking **options is left to check its own
    parameters = list(inspect.signature(factory).parameters.values())[1:]
    valid = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in options:
        if not any(p.kind is p.VAR_KEYWORD for p in parameters) and key not in valid:
            raise UsageError(f"bad options for attack {name!r}: no option {key!r}{suggest(str(key), valid)}; "
                             f"valid: {', '.join(valid) or '(none)'}")
    try:
        attack = factory(threat, **options)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad options for attack {name!r}: {exc}".splitlines()[0]) from None
    if not isinstance(attack, Attack):
        raise UsageError(f"attack {name!r} did not build a harness Attack (got {type(attack).__name__})")
    return attack

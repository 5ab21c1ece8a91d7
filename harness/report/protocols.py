"""What each protocol means, for the renderers: its label and description from the protocol registry
(:func:`harness.evaluation.protocols.protocol_registry`, plugins included), and the order tiers are
shown in. A protocol the registry does not know (a plugin that is not installed) is shown as-is."""

from __future__ import annotations

import inspect

from harness.core.errors import UsageError
from harness.evaluation.protocols import Protocol, protocol_registry

__all__ = ["UNKNOWN", "known_protocols", "protocol_info", "protocol_rank"]

#: harness's own protocols, weakest attacker first; any other protocol follows them, by name.
_TIER_ORDER = ("non-adaptive", "bpda", "adaptive", "adaptive-eot")
UNKNOWN = "Protocol not described by this harness version."


def protocol_rank(name: str) -> tuple[int, str]:
    """The sort key of a protocol: tier order, then name."""
    return (_TIER_ORDER.index(name) if name in _TIER_ORDER else len(_TIER_ORDER), name)


def known_protocols() -> list[str]:
    """Every registered protocol, in tier order."""
    return sorted((item.name for item in protocol_registry().items()), key=protocol_rank)


def _description(protocol: type[Protocol]) -> str:
    """The class's own docstring (else its ``tier``), and its paper."""
    own = protocol.__dict__.get("__doc__")
    text = inspect.cleandoc(own).split("\n\n")[0].replace("\n", " ") if own else protocol.tier
    return f"{text.rstrip('.')}. Paper: {protocol.paper}." if protocol.paper else text


def protocol_info(name: str) -> tuple[str, str]:
    """(label, description) of a protocol; an unknown one gets its own name and :data:`UNKNOWN`."""
    try:
        protocol = protocol_registry().get(name)
    except UsageError:
        return name, UNKNOWN
    return protocol.label, _description(protocol)

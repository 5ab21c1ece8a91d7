"""Best-known robust accuracy: the per-sample worst case over every attack stored for one setting.

RobustBench fills its "external evaluations" column by hand; here it is computed. Cells that differ only
in their attack (same defense, options, network, dataset@fingerprint and variant, threat and eps,
protocol, n and seed, and the precision when one is set, hence the same images) form one setting; a sample counts as robust only if it is
classified correctly clean and survived every attack of its setting. Each attack's share of the breaks is
kept too: how many samples it broke, and how many only it broke.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from harness.core.keys import canonical_json

__all__ = ["SETTING_FIELDS", "BestKnown", "setting_key", "best_known"]

#: The parts of a cell's key config that define its setting: everything but the attack.
SETTING_FIELDS = ("defense", "classifier", "dataset", "threat", "protocol", "n", "seed")


def setting_key(config: Mapping[str, Any]) -> str:
    """The setting of a cell (its key config without the attack), as canonical JSON."""
    precision = {"precision": config["precision"]} if config.get("precision") else {}  # only when set
    return canonical_json({**{k: config.get(k) for k in SETTING_FIELDS}, **precision})


@dataclass(frozen=True)
class BestKnown:
    """One setting: its best-known robust accuracy (a fraction) over ``attacks`` (labels by cell key),
    ``broken`` samples per attack label and ``only`` (broken by that attack alone)."""

    accuracy: float
    attacks: dict[str, str]
    broken: dict[str, int] = field(default_factory=dict)
    only: dict[str, int] = field(default_factory=dict)


def best_known(cells: Iterable[Mapping[str, Any]],
               samples: Iterable[tuple[Any, ...]]) -> dict[str, BestKnown]:
    """Cell key -> the :class:`BestKnown` of its setting, for finished ``cells`` (mappings with
    ``cell_key``, ``config`` and ``attack_label``) and their ``samples`` (``(cell key, index, label,
    clean_pred, adv_pred, ...)``, as :func:`harness.results.queries.done_samples` gives them)."""
    settings: dict[str, dict[str, str]] = defaultdict(dict)  # setting -> {cell key: attack label}
    of_cell: dict[str, str] = {}
    for cell in cells:
        key = setting_key(cell["config"])
        settings[key][cell["cell_key"]] = str(cell["attack_label"])
        of_cell[cell["cell_key"]] = key
    outcome: dict[str, dict[int, dict[str, bool]]] = defaultdict(lambda: defaultdict(dict))
    clean_ok: dict[str, dict[int, bool]] = defaultdict(dict)
    for cell_key, index, label, clean, adv, *_ in samples:
        if cell_key not in of_cell:
            continue
        setting = of_cell[cell_key]
        outcome[setting][index][cell_key] = adv == label
        clean_ok[setting][index] = clean_ok[setting].get(index, True) and clean == label
    result = {}
    for setting, members in settings.items():
        summary = _summarise(members, outcome[setting], clean_ok[setting])
        result.update({key: summary for key in members})
    return result


def _summarise(members: Mapping[str, str], outcome: Mapping[int, Mapping[str, bool]],
               clean_ok: Mapping[int, bool]) -> BestKnown:
    broken = {label: 0 for label in members.values()}
    only = dict(broken)
    robust = 0
    for index, survived in outcome.items():
        if not clean_ok[index]:
            continue
        breakers = [members[key] for key, ok in survived.items() if not ok]
        robust += not breakers
        for label in set(breakers):
            broken[label] += 1
        if len(set(breakers)) == 1:
            only[breakers[0]] += 1
    return BestKnown(robust / max(len(outcome), 1), dict(members), broken, only)

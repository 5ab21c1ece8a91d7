"""The source models of transfer attacks (:mod:`harness.attacks.transfer`; Papernot et al., AsiaCCS 2017;
Tramèr et al., ICLR 2018), resolved for the runner, since the attack layer cannot build defenses.

A source is a defense entry of the run's registry whose network crafts the examples: the undefended
entry (``none``: the run's base classifier) or an entry of kind classifier (its own network). Purifiers
are not sources: a transfer attack replays what a *classifier* was fooled by. A source is checked with
the rest of the request (:func:`check_sources`, before anything trains), named when cells are planned
(entry, version, preset, options and network id, as the runner keys networks) and built only when a
cell that needs it is computed.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

from harness.attacks.base import Attack, Target
from harness.attacks.transfer import SourcedAttack, SourceModel
from harness.classifiers.sources import LoadedClassifier
from harness.core.artifacts import ArtifactCache
from harness.core.entry import Defense, DefenseEntry, Kind
from harness.core.errors import UsageError
from harness.core.noise import FixedNoise
from harness.core.registry import Registry, suggest
from harness.data import DatasetInfo
from harness.evaluation.building import build_defense, own_network
from harness.evaluation.guards import CheckedDefense

__all__ = ["SOURCE_KINDS", "source_names", "check_sources", "attack_note", "TransferSources"]

#: the kinds of entry a transfer attack can craft on
SOURCE_KINDS = (Kind.UNDEFENDED, Kind.CLASSIFIER)


def source_names(attacks: Iterable[Attack]) -> list[str]:
    """The source entries the ``attacks`` need, in order, once each."""
    return list(dict.fromkeys(a.source for a in attacks if isinstance(a, SourcedAttack)))


def _valid_sources(registry: Registry[DefenseEntry]) -> list[str]:
    return [i.value.name for i in registry.items() if i.value.kind in SOURCE_KINDS]


def check_sources(names: Iterable[str], registry: Registry[DefenseEntry], dataset: str, preset: str | None,
                  options: Mapping[str, Any]) -> bool:
    """Raise a one-line :class:`UsageError` naming the valid sources unless every name is an entry of
    ``registry`` that can craft on ``dataset``; return whether one of them needs the base classifier."""
    base = False
    for name in names:
        if name not in registry:
            valid = _valid_sources(registry)
            raise UsageError(f"unknown transfer source {name!r}{suggest(name, valid)}; valid: "
                             f"{', '.join(valid) or '(none)'}")
        entry = registry.get(name)
        if entry.kind not in SOURCE_KINDS:
            raise UsageError(f"transfer source {name!r} is a {entry.kind.value}: a source crafts on a "
                             f"classifier; valid: {', '.join(_valid_sources(registry)) or '(none)'}")
        entry.check_dataset(dataset, role="a transfer source for")
        entry.resolve_preset(preset)
        entry.select_options(options)
        base = base or entry.uses_base_classifier
    return base


def attack_note(attack: Attack) -> str:
    """What a cell of a transfer attack records beside its protocol ("" for other attacks)."""
    if not isinstance(attack, SourcedAttack):
        return ""
    return (f"examples crafted on {attack.source!r} and replayed: the protocol says how the defense is "
            f"evaluated (and which setting the cell joins), not what the attack differentiates")


class TransferSources:
    """The transfer sources of one run on one dataset: named on first need, built on first use (once)."""

    def __init__(self, registry: Registry[DefenseEntry], info: DatasetInfo, artifacts: ArtifactCache,
                 base: Callable[[], LoadedClassifier], *, preset: str | None, options: Mapping[str, Any],
                 data_root: str | None, progress: bool, seed: int, device: torch.device | str = "cpu"):
        self.registry, self.info, self.artifacts, self.base = registry, info, artifacts, base
        self.device = torch.device(device)  # where the source models run
        self.preset, self.options = preset, dict(options)
        self.build_args = dict(data_root=data_root, progress=progress, seed=seed)
        self._models: dict[str, SourceModel] = {}

    def bind(self, attack: Attack) -> Attack:
        """``attack`` bound to its source model if it needs one, else ``attack`` itself."""
        if isinstance(attack, SourcedAttack):
            return attack.with_source(self.resolve(attack.source))
        return attack

    def resolve(self, name: str) -> SourceModel:
        """The source model of entry ``name`` (checked by :func:`check_sources`)."""
        if name not in self._models:
            self._models[name] = self._resolve(self.registry.get(name))
        return self._models[name]

    def _resolve(self, entry: DefenseEntry) -> SourceModel:
        preset = entry.resolve_preset(self.preset)
        options = entry.select_options(self.options)
        build: Callable[[], Defense]
        if entry.uses_base_classifier:
            classifier = self.base()
            network = classifier.id
            build = lambda: build_defense(entry, preset, classifier, self.info, self.artifacts,  # noqa: E731
                                          options=options, **self.build_args)
        else:
            own = own_network(entry, preset, self.info, self.artifacts, options=options, **self.build_args)
            network, built = own.id, own.defense
            build = (lambda: built) if built is not None else (  # noqa: E731
                lambda: build_defense(entry, preset, None, self.info, self.artifacts, options=options,
                                      **self.build_args))
        identity = {"entry": entry.name, "version": entry.version, "preset": preset, "options": options,
                    "network": network}
        cache: list[Defense | Exception] = []
        device = self.device

        def target(seed: int) -> Target:
            if not cache:
                try:
                    cache.append(CheckedDefense(build(), self.info.num_classes).to(device))
                except UsageError:
                    raise
                except Exception as exc:  # noqa: BLE001 - fails each cell that needs this source
                    cache.append(exc)
            defense = cache[0]
            if isinstance(defense, Exception):
                raise defense
            noise = FixedNoise(seed, namespace="defense")
            return Target(lambda x, indices: defense(x, noise.draws(indices)), index_dependent=entry.stochastic)

        return SourceModel(identity, target)

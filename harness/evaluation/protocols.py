"""How an attack meets a defense.

* ``non-adaptive`` (DiffPure's non-adaptive setting, used by the MAEP paper): the attack sees the bare
  classifier; the defense then classifies the adversarial images.
* ``adaptive`` (fixed randomness, Liu & Wei, arXiv 2505.22839): the attack sees the whole defended
  model with exact gradients; a stochastic defense gets per-sample fixed noise, the same in every
  attack iteration and at evaluation, which makes it a deterministic function of the input.
* ``adaptive-eot`` (fresh randomness; Athalye et al., ICML 2018): exact gradients averaged over the
  attack's ``eot`` fresh draws per step; evaluation with fresh draws, plus worst-of-N over N
  re-draws (DiffHammer, Wang et al. 2024: N = 10), stored per sample in ``extra``.
* ``bpda`` (Athalye et al., ICML 2018): the purifier runs forward with the evaluation's fixed noise,
  but backward is the identity (straight-through ``x + (P(x) - x).detach()``).

As in AutoAttack, only the points the defense classifies correctly are attacked; the others keep their
clean image, so robust accuracy can never exceed clean accuracy.

EOT only pays when the target changes between calls, i.e. under fresh randomness (``adaptive-eot``).
Every other protocol attacks a fixed function, on which ``eot`` draws are ``eot`` identical gradients:
:meth:`Protocol.attack_for` runs such an attack with one draw per step, and its ``params()`` (``eot``
1) are the attack actually used, the ones to record in the cell.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from harness.attacks.base import Attack, Target
from harness.core.entry import Defense, DefenseEntry, Kind
from harness.core.errors import UsageError
from harness.core.noise import FixedNoise, FreshNoise, _stream_seed
from harness.core.passes import gradient_free
from harness.core.registry import Registry


@dataclass
class BatchResult:
    clean_pred: torch.Tensor
    adv_pred: torch.Tensor
    x_adv: torch.Tensor
    extra: list[dict] | None = None  # optional per-sample fields, stored in SampleResult.extra


class Protocol(ABC):
    """How an attack meets a defense. Subclasses registered in :func:`protocol_registry` (or through the
    ``harness.protocols`` entry-point group) declare a ``name``, a short ``label``, a ``tier`` (what the
    attack sees, stored with each cell), a ``paper``, and whether they differ from ``adaptive`` only in
    how they treat a purifier (``purifier_only``): for an entry without one they attack the same
    function, so its cell is computed once, under ``adaptive``."""

    name: str
    label: str
    tier: str  # the evaluation tier shown in reports
    paper: str = ""
    fresh_draws: bool = False  # whether the target draws new randomness on every call
    purifier_only: bool = False

    def attack_for(self, attack: Attack) -> Attack:
        """The attack this protocol runs: ``attack`` itself, or, when the target is the same function
        on every call, a copy with one EOT draw per step (the other draws would repeat it exactly)."""
        if self.fresh_draws or getattr(attack, "eot", 1) <= 1:
            return attack
        single = copy.copy(attack)
        single.eot = 1
        return single

    @abstractmethod
    def target(self, entry: DefenseEntry, defense: Defense, seed: int) -> Target:
        """What the attack differentiates."""

    def check(self, entry: DefenseEntry) -> None:
        """Raise if this protocol cannot evaluate ``entry`` honestly."""

    def run(self, entry: DefenseEntry, defense: Defense, attack: Attack, x: torch.Tensor,
            y: torch.Tensor, indices: torch.Tensor, seed: int) -> BatchResult:
        attack = self.attack_for(attack)
        evaluation = FixedNoise(seed, namespace="defense")
        with gradient_free(defense):
            clean_pred = defense(x, evaluation.draws(indices)).argmax(1)
        correct = clean_pred == y
        x_adv = x.clone()
        adv_pred = clean_pred.clone()
        fooled_at = torch.full((len(x),), -1, dtype=torch.long)
        if correct.any():
            sel = correct.nonzero().squeeze(1)
            x_adv[sel] = attack.perturb(self.target(entry, defense, seed), x[sel], y[sel], indices[sel], seed)
            with gradient_free(defense):
                adv_pred[sel] = defense(x_adv[sel], evaluation.draws(indices[sel])).argmax(1)
            fooled_at[sel] = _fooled_at(attack, len(sel))
        return BatchResult(clean_pred, adv_pred, x_adv, _step_record(attack, fooled_at, correct & (adv_pred != y)))


def _fooled_at(attack: Attack, n: int) -> torch.Tensor:
    """The step at which ``attack``'s last run first fooled each of its ``n`` points (-1: not within its
    steps), when the attack records it (PGD does), else all -1."""
    record = getattr(attack, "fooled_at", None)
    return record.cpu() if isinstance(record, torch.Tensor) and len(record) == n else torch.full((n,), -1)


def _step_record(attack: Attack, fooled_at: torch.Tensor, fooled: torch.Tensor) -> list[dict] | None:
    """Per sample ``{"fooled_at": step}`` for an attack that records it (-1: not fooled, or not attacked;
    an attacked point ``fooled`` only by the final iterate counts as step ``steps``): the per-iterate
    record of the not-converged flag."""
    steps = getattr(attack, "steps", None)
    if getattr(attack, "fooled_at", None) is None or not isinstance(steps, int):
        return None
    at = torch.where((fooled_at < 0) & fooled.cpu(), torch.full_like(fooled_at, steps), fooled_at)
    return [{"fooled_at": int(k)} for k in at]


class NonAdaptive(Protocol):
    """The attacker ignores the defense: adversarial examples are crafted against the base classifier
    alone, then evaluated on the full defense. Weakest tier; an upper bound on robust accuracy, not a
    security claim."""

    name = "non-adaptive"
    label = "Non-adaptive"
    tier = "non-adaptive: attack the bare classifier, then purify"
    paper = "Nie et al., ICML 2022 (DiffPure's non-adaptive setting)"
    purifier_only = True

    def target(self, entry, defense, seed):
        classifier = defense.classifier
        return Target(lambda x, indices: classifier(x))


class AdaptiveFixed(Protocol):
    """Adaptive attack with exact gradients through the whole defense; a stochastic defense is attacked
    with its randomness fixed per sample (the fixed-randomness protocol of Liu & Wei), which makes it a
    deterministic function."""

    name = "adaptive"
    label = "Adaptive (exact)"
    tier = "adaptive: attack the whole defense, exact gradients, fixed randomness"
    paper = "Liu & Wei, arXiv 2505.22839 (fixed randomness)"

    def check(self, entry):
        if not entry.differentiable:
            raise UsageError(f"defense {entry.name!r} is not differentiable: the adaptive protocol "
                             f"needs exact gradients; valid protocols here: non-adaptive")

    def target(self, entry, defense, seed):
        noise = FixedNoise(seed, namespace="defense")
        return Target(lambda x, indices: defense(x, noise.draws(indices)),
                      index_dependent=entry.stochastic)


def _batch_seed(seed: int, purpose: str, indices: torch.Tensor) -> int:
    """The seed of one batch's fresh-noise stream, derived from the cell seed, purpose and indices."""
    return _stream_seed(seed, purpose, tuple(int(i) for i in indices))


class AdaptiveEOT(Protocol):
    """Adaptive attack on a stochastic defense with fresh random draws on every call; gradients are
    averaged over draws (Expectation over Transformation), and the evaluation redraws too (worst-of-N
    recorded per sample)."""

    name = "adaptive-eot"
    label = "Adaptive (EOT)"
    paper = "Athalye et al., ICML 2018 (EOT); DiffHammer, Wang et al. 2024 (worst-of-N)"
    fresh_draws = True
    worst_of = 10
    tier = (f"adaptive-EOT: attack the whole defense, exact gradients, fresh randomness (EOT); "
            f"fresh-randomness evaluation, worst-of-{worst_of} in extra")

    def check(self, entry):
        AdaptiveFixed().check(entry)

    def target(self, entry, defense, seed):
        noise = FreshNoise(seed)
        return Target(lambda x, indices: defense(x, noise.draws(indices)))

    def run(self, entry, defense, attack, x, y, indices, seed):
        evaluation = FreshNoise(_batch_seed(seed, "evaluate", indices))
        with gradient_free(defense):
            clean_pred = defense(x, evaluation.draws(indices)).argmax(1)
        x_adv = x.clone()
        sel = (clean_pred == y).nonzero().squeeze(1)
        if len(sel):
            target = self.target(entry, defense, _batch_seed(seed, "attack", indices))
            x_adv[sel] = attack.perturb(target, x[sel], y[sel], indices[sel], seed)
        with gradient_free(defense):
            preds = torch.stack([defense(x_adv, evaluation.draws(indices)).argmax(1)
                                 for _ in range(self.worst_of)])
        correct = (preds == y).sum(0)
        extra = [{"worst_of": self.worst_of, "adv_correct_draws": int(c)} for c in correct]
        return BatchResult(clean_pred, preds[0], x_adv, extra)


class BPDA(Protocol):
    """Adaptive attack on the full defense, with the purifier replaced by the identity on the backward
    pass (BPDA, Athalye et al. 2018)."""

    name = "bpda"
    label = "Adaptive (BPDA)"
    paper = "Athalye et al., ICML 2018"
    purifier_only = True
    tier = "adaptive-BPDA: attack the whole defense, identity backward through the purifier, fixed randomness"

    def target(self, entry, defense, seed):
        noise = FixedNoise(seed, namespace="defense")

        def fn(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            # no_grad, not inference mode: the purified images enter the attack's autograd graph below
            with torch.no_grad():
                purified = defense.purify(x.detach(), noise.draws(indices))
            return defense.classifier(x + (purified - x).detach())

        return Target(fn, index_dependent=entry.stochastic)


PROTOCOL_GROUP = "harness.protocols"
_registry: Registry[type[Protocol]] | None = None


def _describe(protocol: type[Protocol]) -> tuple[str, str]:
    return protocol.tier, protocol.paper


def protocol_registry() -> Registry[type[Protocol]]:
    """Every protocol: harness's own, then plugins of the ``harness.protocols`` group."""
    global _registry
    if _registry is None:
        registry: Registry[type[Protocol]] = Registry("protocol", group=PROTOCOL_GROUP, expects=type,
                                                      describe=_describe, name_of=lambda p: p.name)
        for protocol in (NonAdaptive, AdaptiveFixed, AdaptiveEOT, BPDA):
            registry.add(protocol.name, protocol)
        _registry = registry
    return _registry


def get_protocol(name: str) -> Protocol:
    return protocol_registry().get(name)()


def protocol_for(protocol: Protocol, entry: DefenseEntry) -> Protocol:
    """The protocol that evaluates ``entry`` under ``protocol``: ``adaptive`` in place of a protocol that
    differs from it only in the purifier, for an entry without one."""
    if protocol.purifier_only and entry.kind is not Kind.PURIFIER:
        return AdaptiveFixed()
    return protocol

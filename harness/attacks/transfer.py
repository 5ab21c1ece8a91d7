"""Transfer attack: adversarial examples crafted with white-box PGD on another model (the *source*), then
replayed against the evaluated defense, whose gradients are never used (Papernot et al., "Practical
Black-Box Attacks against Machine Learning", AsiaCCS 2017; Tramèr et al., "Ensemble Adversarial
Training: Attacks and Defenses", ICLR 2018, whose transfer evaluation this follows).

``transfer[:source=none,steps=20,loss=ce,...]``: ``source`` names a defense entry of the run's registry
whose network crafts the examples: ``none`` (default), the undefended base classifier, the classic
transfer setting for purifiers, or an entry of kind classifier. The attack layer cannot build defenses,
so the runner resolves the source (:mod:`harness.evaluation.transfer_sources`) and hands it over with
:meth:`TransferAttack.with_source`; the source's identity (entry, version, preset, options and the
network id the runner keys cells with) is then part of :meth:`TransferAttack.params`, so every source
gets cells of its own.

The crafting is harness's PGD (:class:`~harness.attacks.pgd.PGD`) with its bookkeeping: each sample keeps
the first iterate that fooled the *source* (else the final one). Transferred from a model to itself, the
attack is therefore exactly white-box PGD. Only the source's outputs steer the examples, so the attack
is black-box for the target: it feeds the ``black-box-beats-white-box`` flag.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from harness.attacks.base import Attack, Target
from harness.attacks.pgd import PGD
from harness.core.errors import UsageError
from harness.core.threat import ThreatModel

__all__ = ["DEFAULT_SOURCE", "SourceModel", "SourcedAttack", "TransferAttack"]

#: the default source: the undefended base classifier
DEFAULT_SOURCE = "none"


@dataclass(frozen=True)
class SourceModel:
    """The model a transfer attack crafts on, as the runner resolved it: ``identity`` (stored in the
    attack's params, hence in the cell key) and ``target(seed)``, the source as a white-box target for a
    cell seed (built on first call: nothing is built for cells that are already stored)."""

    identity: Mapping[str, Any]
    target: Callable[[int], Target]


class SourcedAttack(Attack):
    """An attack that needs a source model the runner resolves: ``source`` names the defense entry."""

    source: str
    source_model: SourceModel | None = None

    def with_source(self, model: SourceModel) -> "SourcedAttack":
        """A copy of this attack bound to ``model`` (the resolved ``source``)."""
        bound = copy.copy(self)
        bound.source_model = model
        return bound

    def _bound(self) -> SourceModel:
        if self.source_model is None:
            raise UsageError(f"attack {self.name!r} needs its source model {self.source!r}, which only "
                             f"`harness run` (or harness.evaluate) resolves; it cannot run here")
        return self.source_model


class TransferAttack(SourcedAttack):
    """PGD on the ``source`` entry's network, the examples replayed against the target."""

    name = "transfer"
    summary = ("transfer, black-box: PGD on another entry's network (default: the undefended base "
               "classifier), replayed: transfer[:source=none,steps=20,loss=ce|margin,restarts=1]")
    paper = "Papernot et al., AsiaCCS 2017; Tramèr et al., ICLR 2018"

    def __init__(self, threat: ThreatModel, source: str = DEFAULT_SOURCE, steps: int = 20,
                 step_size: float | None = None, random_start: bool = True, loss: str = "ce",
                 restarts: int = 1):
        super().__init__(threat)
        if isinstance(source, int) and not isinstance(source, bool):
            source = str(source)  # "source=1" was read as a number; entry names may be digits
        if not isinstance(source, str) or not source or not source.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"source must name a defense entry (like {DEFAULT_SOURCE}), got {source!r}")
        self.source = source
        # the crafting attack; it validates steps, step_size, random_start, loss and restarts
        self.craft = PGD(threat, steps=steps, step_size=step_size, random_start=random_start, loss=loss,
                         restarts=restarts)

    def params(self) -> dict[str, Any]:
        craft = self.craft
        return {"name": self.name, "norm": self.threat.norm, "source": dict(self._bound().identity),
                "craft": "pgd", "steps": craft.steps, "step_size": craft.step_size,
                "random_start": craft.random_start, "loss": craft.loss, "restarts": craft.restarts}

    def label(self) -> str:
        return f"Transfer({self.source})-{self.craft.label()}"

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
                seed: int) -> torch.Tensor:
        """Craft on the source (``target`` is not used: no gradient, no query of it)."""
        source = self._bound().target(seed)
        return self.craft.perturb(source, x, y, indices, seed).detach()

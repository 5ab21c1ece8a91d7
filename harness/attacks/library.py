"""The single attacks of the autoattack library (Croce & Hein, ICML 2020, and its components), each with
every setting that changes its result in ``params()``.

* ``apgd-ce`` / ``apgd-dlr``: APGD (Croce & Hein, ICML 2020) on the cross-entropy or the DLR loss;
* ``apgd-t``: targeted APGD on the DLR loss, against the ``targets`` most likely wrong classes;
* ``fab-t``: targeted FAB (Croce & Hein, ICML 2020, "Minimally distorted adversarial examples with a
  fast adaptive boundary attack");
* ``square``: Square, black-box, score-based (Andriushchenko et al., ECCV 2020), ``queries`` per point.

Like AutoAttack, the library re-forms batches as points fall, so a target with fixed per-sample
randomness is attacked one sample at a time; :class:`~harness.attacks.autoattack.AutoAttackAdapter` runs
the ensemble the same way.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from harness.attacks.base import Attack, Target
from harness.core.threat import ThreatModel

__all__ = ["LibraryAttack", "APGDCE", "APGDDLR", "APGDT", "FABT", "Square"]

_NORMS = {"linf": "Linf", "l2": "L2"}


class _Bound(nn.Module):
    """``target`` as a module of ``x`` alone, for fixed dataset ``indices`` (one index broadcast when the
    library hands a sub-batch of a single sample)."""

    def __init__(self, target: Target, indices: torch.Tensor):
        super().__init__()
        self.target, self.indices = target, indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices = self.indices if len(self.indices) == len(x) else self.indices[:1].expand(len(x))
        return self.target(x, indices)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


class LibraryAttack(Attack):
    """One attack of the autoattack library (``library_name``), run as its ``custom`` version."""

    library_name: str = ""
    label_text: str = ""
    summary: str
    paper = "Croce & Hein, ICML 2020"

    def __init__(self, threat: ThreatModel, batch_size: int = 256):
        super().__init__(threat)
        self.batch_size = _positive_int("batch_size", batch_size)

    def settings(self) -> dict[str, Any]:
        """The settings of this attack that change its result."""
        return {}

    def params(self) -> dict[str, Any]:
        import pyautoattack

        return {"name": self.name, "norm": self.threat.norm, **self.settings(), "library": "pyautoattack",
                "library_version": getattr(pyautoattack, "__version__", "?")}

    def label(self) -> str:
        return self.label_text

    def library_arguments(self) -> dict[str, Any]:
        """How the library runs this attack: its ``custom`` version with this one attack."""
        return {"version": "custom", "attacks": [self.library_name]}

    def configure(self, attack: Any) -> None:
        """Set the library's attack objects to :meth:`settings`."""

    def _run(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        from pyautoattack import AutoAttack

        attack = AutoAttack(module, norm=_NORMS[self.threat.norm], eps=self.threat.eps.value, seed=seed,
                            device=x.device, **self.library_arguments())
        attack.verbose = False
        self.configure(attack)
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        with torch.random.fork_rng():  # the library reseeds torch's global RNG
            x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=self.batch_size)
        return x_adv

    def perturb(self, target, x, y, indices, seed):
        if self.threat.eps.value == 0:
            return x.clone()
        if not target.index_dependent:
            return self._run(_Bound(target, indices), x, y, seed).detach()
        rows = [self._run(_Bound(target, indices[i:i + 1]), x[i:i + 1], y[i:i + 1], seed) for i in range(len(x))]
        return torch.cat(rows).detach()


class _APGD(LibraryAttack):
    def __init__(self, threat: ThreatModel, restarts: int = 5, iterations: int = 100, batch_size: int = 256):
        super().__init__(threat, batch_size)
        self.restarts = _positive_int("restarts", restarts)
        self.iterations = _positive_int("iterations", iterations)

    def settings(self):
        return {"restarts": self.restarts, "iterations": self.iterations}

    def configure(self, attack):
        attack.apgd.n_restarts, attack.apgd.n_iter = self.restarts, self.iterations


class APGDCE(_APGD):
    name, library_name, label_text = "apgd-ce", "apgd-ce", "APGD-CE"
    summary = "APGD on the cross-entropy loss: apgd-ce[:restarts=5,iterations=100]"


class APGDDLR(_APGD):
    name, library_name, label_text = "apgd-dlr", "apgd-dlr", "APGD-DLR"
    summary = "APGD on the DLR loss: apgd-dlr[:restarts=5,iterations=100]"


class _Targeted(LibraryAttack):
    """A targeted library attack against the ``targets`` most likely wrong classes, one restart each."""

    def __init__(self, threat: ThreatModel, targets: int = 9, iterations: int = 100, batch_size: int = 256):
        super().__init__(threat, batch_size)
        self.targets = _positive_int("targets", targets)
        self.iterations = _positive_int("iterations", iterations)

    def settings(self):
        return {"targets": self.targets, "restarts": 1, "iterations": self.iterations}


class APGDT(_Targeted):
    name, library_name, label_text = "apgd-t", "apgd-t", "APGD-T"
    summary = "targeted APGD on the DLR loss: apgd-t[:targets=9,iterations=100]"

    def configure(self, attack):
        attack.apgd_targeted.n_target_classes, attack.apgd_targeted.n_restarts = self.targets, 1
        attack.apgd_targeted.n_iter = self.iterations


class FABT(_Targeted):
    name, library_name, label_text = "fab-t", "fab-t", "FAB-T"
    summary = "targeted FAB: fab-t[:targets=9,iterations=100]"
    paper = "Croce & Hein, ICML 2020 (FAB)"

    def configure(self, attack):
        attack.fab.n_target_classes, attack.fab.n_iter = self.targets, self.iterations


class Square(LibraryAttack):
    name, library_name, label_text = "square", "square", "Square"
    summary = "Square, black-box (scores only): square[:queries=5000]"
    paper = "Andriushchenko et al., ECCV 2020"

    def __init__(self, threat: ThreatModel, queries: int = 5000, batch_size: int = 256):
        super().__init__(threat, batch_size)
        self.queries = _positive_int("queries", queries)

    def settings(self):
        return {"queries": self.queries, "p_init": 0.8, "restarts": 1}

    def label(self) -> str:
        return f"Square-{self.queries}"

    def configure(self, attack):
        attack.square.n_queries = self.queries

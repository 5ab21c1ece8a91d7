"""Evaluation-quality flags that need several cells: computed from the stored cells at report time.

* ``black-box-beats-white-box``: a black-box attack (Square, or a transfer attack) broke points that no
  white-box attack of the same setting broke: the gradients the white-box attacks followed mislead them;
* ``eps-not-monotone``: best-known robust accuracy rises with eps across the stored radii of one setting
  (by more than one sample), which no sound attack allows;
* ``not-converged``: the attack was still breaking points over the last quarter of its steps
  (``fooled_at`` of the per-sample record): more steps would lower the number;
* ``non-adaptive-only``: a purifier has non-adaptive cells but no adaptive one for the same setting and
  eps, so its number is an upper bound.

Per-cell flags (randomness, probabilities, vanishing gradients, dynamic defenses) are computed while a
cell runs (:mod:`harness.evaluation.checks`) and stored with it; :func:`cell_flags` merges both.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Iterable, Mapping

from harness.analysis.best_known import BestKnown, setting_key
from harness.core.keys import canonical_json

__all__ = ["BLACK_BOX_ATTACKS", "CROSS_CELL_HELP", "cell_flags"]

#: attack names (``config["attack"]["name"]``) that use no gradient of the target
BLACK_BOX_ATTACKS = frozenset({"square", "transfer"})
ADAPTIVE_PROTOCOLS = frozenset({"adaptive", "bpda", "adaptive-eot"})
CONVERGENCE_SHARE = 0.01  # share of points first broken in the last quarter of the steps

CROSS_CELL_HELP = {
    "black-box-beats-white-box": "a black-box attack broke points that the white-box attacks of the same "
                                 "setting did not: their gradients mislead them",
    "eps-not-monotone": "best-known robust accuracy rises with eps across this setting's radii",
    "not-converged": "the attack was still breaking points over its last quarter of steps: use more steps",
    "non-adaptive-only": "a purifier evaluated non-adaptively only: an upper bound, not a robustness claim",
}


def _flag(name: str, detail: str, share: float = 1.0) -> dict[str, Any]:
    return {"name": name, "detail": detail, "share": share}


def _black_box(cell: Mapping[str, Any], known: BestKnown, attacks: Mapping[str, str]) -> dict | None:
    if attacks.get(cell["cell_key"]) not in BLACK_BOX_ATTACKS:
        return None
    label = known.attacks[cell["cell_key"]]
    white = [key for key, name in attacks.items() if key in known.attacks and name not in BLACK_BOX_ATTACKS]
    if white and known.only.get(label, 0):
        return _flag("black-box-beats-white-box", f"{label} alone broke {known.only[label]} point(s)")
    return None


def _without_eps(config: Mapping[str, Any]) -> str:
    threat = {k: v for k, v in (config.get("threat") or {}).items() if k not in ("eps", "eps_text")}
    return canonical_json({"setting": json.loads(setting_key(config)) | {"threat": threat}})


def _eps_monotone(cells: list[Mapping[str, Any]], known: Mapping[str, BestKnown]) -> dict[str, dict]:
    """Cell key -> the eps-not-monotone flag, for settings whose best-known accuracy rises with eps."""
    curves: dict[str, dict[float, tuple[float, int]]] = defaultdict(dict)
    for cell in cells:
        config = cell["config"]
        curves[_without_eps(config)][float(cell["eps"])] = (known[cell["cell_key"]].accuracy, int(cell["n"]))
    rising: dict[str, str] = {}
    for curve_key, curve in curves.items():
        points = sorted(curve.items())
        for (e0, (a0, n)), (e1, (a1, _)) in zip(points, points[1:]):
            if a1 > a0 + 1 / max(n, 1) + 1e-9:
                rising[curve_key] = f"{100 * a0:.1f}% at eps {e0:.4g} but {100 * a1:.1f}% at eps {e1:.4g}"
                break
    return {c["cell_key"]: _flag("eps-not-monotone", rising[_without_eps(c["config"])]) for c in cells
            if _without_eps(c["config"]) in rising}


def _converged(cell: Mapping[str, Any], fooled_at: Iterable[int]) -> dict | None:
    steps = (cell["config"].get("attack") or {}).get("steps")
    late = [k for k in fooled_at if steps and k >= 0.75 * steps]
    share = len(late) / max(int(cell["n"]), 1)
    if steps and steps >= 4 and share > CONVERGENCE_SHARE:
        return _flag("not-converged", f"{len(late)} point(s) first broken after step {int(0.75 * steps)} of "
                                      f"{steps}", share)
    return None


def _upper_bound_only(cells: list[Mapping[str, Any]]) -> dict[str, dict]:
    def place(config):  # the setting without attack, protocol and seed
        return canonical_json({k: config.get(k) for k in ("defense", "classifier", "dataset", "threat")})

    adaptive = {place(c["config"]) for c in cells if c["config"].get("protocol") in ADAPTIVE_PROTOCOLS}
    return {c["cell_key"]: _flag("non-adaptive-only", "no adaptive cell for this purifier, data and eps")
            for c in cells if c.get("entry_kind") == "purifier" and c["config"].get("protocol") == "non-adaptive"
            and place(c["config"]) not in adaptive}


def cell_flags(cells: Iterable[Mapping[str, Any]], known: Mapping[str, BestKnown],
               fooled_at: Mapping[str, list[int]]) -> dict[str, list[dict[str, Any]]]:
    """Cell key -> every flag of the cell: those stored while it ran (``metrics["flags"]``) and the
    cross-cell ones. ``cells`` are finished cells (``cell_key``, ``config``, ``eps``, ``n``, ``metrics``, ``entry_kind``),
    ``known`` their best-known records, ``fooled_at`` the step each broken sample first fell at."""
    cells = list(cells)
    attacks = {c["cell_key"]: (c["config"].get("attack") or {}).get("name") for c in cells}
    monotone = _eps_monotone(cells, known)
    upper = _upper_bound_only(cells)
    out = {}
    for cell in cells:
        key = cell["cell_key"]
        stored = (cell.get("metrics") or {}).get("flags") or []
        found = [_black_box(cell, known[key], attacks), monotone.get(key), upper.get(key),
                 _converged(cell, fooled_at.get(key, []))]
        out[key] = list(stored) + [f for f in found if f is not None]
    return out

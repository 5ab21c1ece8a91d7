"""Run the fixed-randomness analyses for one defense setting and store the record.

:func:`run_study` builds the defense exactly as ``harness run`` does (same entry, preset, options and
classifier, the same test images as a cell of ``n`` images), attacks them with the fixed-randomness adaptive protocol (for the
adversarial distances and compression), runs :func:`harness.analysis.fixed_randomness.analyse` and
saves the record in the results DB (:func:`harness.analysis.gains.save_record`, with a
:class:`harness.results.schema.Run` holding the code provenance), where ``harness report`` picks it up.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from harness.analysis.fixed_randomness import analyse
from harness.analysis.gains import save_record
from harness.core.artifacts import ArtifactCache
from harness.attacks.catalog import build_attack
from harness.evaluation.building import build_defense
from harness.classifiers.sources import DEFAULT_CLASSIFIER, resolve_classifier
from harness.core.errors import UsageError
from harness.data import load_split
from harness.evaluation.protocols import get_protocol
from harness.results.provenance import code_provenance
from harness.core.entry import Kind, defense_registry
from harness.evaluation.runner import evaluation_subset
from harness.results.database import open_db
from harness.results.queries import finish_run, new_run
from harness.results.schema import Run
from harness.core.threat import Epsilon, ThreatModel

__all__ = ["StudyRequest", "run_study"]


@dataclass(frozen=True)
class StudyRequest:
    defense: str
    dataset: str = "cifar10"
    classifier: str = DEFAULT_CLASSIFIER
    preset: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    n: int = 32
    seed: int = 0
    threat: str = "linf"
    eps: str = "8/255"
    attack: Mapping[str, Any] = field(default_factory=lambda: {"name": "pgd", "steps": 20})
    radii: Sequence[float] = (2 / 255, 4 / 255, 8 / 255)
    spread_seeds: Sequence[int] = (0, 1, 2)
    data_root: str | None = None
    artifact_root: str | None = None
    progress: bool = True


def run_study(request: StudyRequest, engine: Engine | None = None) -> str:
    """Analyse ``request.defense`` on the ``n`` images a cell evaluates and store the record in the
    results DB behind ``engine`` (default: :func:`harness.results.database.open_db`); return the record's key."""
    engine = engine if engine is not None else open_db()
    with Session(engine) as session:
        run_id = new_run(session, shlex.join(sys.argv), code_provenance()).id
    try:
        meta, record = _study(request)
        key = save_record(engine, meta, record, run_id)
    except BaseException:
        _finish(engine, run_id, "failed")
        raise
    _finish(engine, run_id, "done")
    return key


def _finish(engine: Engine, run_id: int, status: str) -> None:
    with Session(engine) as session:
        finish_run(session, session.get(Run, run_id), status)


def _study(request: StudyRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    """The setting (``meta``) and the record of the analyses."""
    entry = defense_registry().get(request.defense)
    if entry.kind is not Kind.PURIFIER:
        raise UsageError(f"defense {entry.name!r} is a {entry.kind.value}: the fixed-randomness analyses "
                         f"study a purifier")
    options = entry.check_options(request.options)
    test = load_split(request.dataset, "test", request.data_root)
    artifacts = ArtifactCache(request.artifact_root)
    classifier = resolve_classifier(request.classifier, test.info, artifacts=artifacts,
                                    data_root=request.data_root, threat=request.threat,
                                    progress=request.progress)
    preset = entry.resolve_preset(request.preset)
    defense = build_defense(entry, preset, classifier, test.info, artifacts, options=options,
                            data_root=request.data_root, progress=request.progress)
    indices = evaluation_subset(len(test.labels), min(request.n, len(test.labels)))
    x, y = test.float_images(indices), test.labels[indices]
    threat = ThreatModel(request.threat, Epsilon.parse(request.eps))
    attack = build_attack(request.attack, threat)
    adversarial = get_protocol("adaptive").run(entry, defense, attack, x, y, indices, request.seed).x_adv
    record = analyse(defense.purify, x, indices, seed=request.seed, radii=request.radii,
                     spread_seeds=request.spread_seeds, spread_radius=threat.eps.value, x_adv=adversarial)
    record.update(attack=attack.params(), eps=request.eps, threat=request.threat,
                  provenance=getattr(defense.purifier, "provenance", {}))
    meta = {"defense": entry.name, "version": entry.version, "preset": preset or "",
            "options": options, "dataset": test.info.name, "classifier": classifier.id,
            "fingerprint": test.fingerprint}
    return meta, record

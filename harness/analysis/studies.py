"""Studies as declarative files: the grids of cells a paper's tables need, its analyses, what it renders.

A study is a TOML file (``leaderboards/studies/<name>.toml``, read with :mod:`tomllib`)::

    name = "maep-paper"                 # = the file's stem
    title = "..."
    description = "..."
    paper = "..."                       # the paper it reproduces (citation)

    [[grid]]                            # one `harness run`; every key but `defenses` is optional
    defenses = ["none", "maep"]         # run's --defense
    dataset = "cifar10"                 # --dataset
    variants = ["clean"]                # --variant
    eps = ["8/255"]                     # --eps
    attacks = ["pgd:steps=20", "autoattack"]   # --attack, run's spec syntax
    protocols = ["non-adaptive", "adaptive"]   # --protocol
    n = 512                             # --n
    seeds = [0]                         # --seed
    train_datasets = ["same"]           # --train-dataset
    train_seeds = [0]                   # --train-seed (or train_seed = 0); several make one grid each
    options = { tstar = 0.2 }           # --option
    preset = "small"                    # --preset
    classifier = "trained:small"        # --classifier (and train_classifier)

    [[analysis]]                        # optional, after the grids
    kind = "fixed-randomness"           # or "representations"; the keys of `harness analyse KIND`
    defense = "diffpure"

    [[render]]                          # what the study shows, and where `harness report` shows it
    label = "Table 1"
    caption = "..."
    section = "leaderboard"             # one of SECTIONS

Every key is checked when a study is loaded (unknown keys, defenses, attacks, protocols, options, ... are
a one-line :class:`UsageError` naming the valid choices), grids through the runner's own
:func:`~harness.evaluation.runner.check_request`. Study files are looked up in ``--studies DIR``, else
``$HARNESS_STUDIES``, else ``leaderboards/studies`` of the checkout harness runs from, else of the working
directory. :func:`run_study` computes what is missing (each grid, then each analysis not stored yet);
:func:`study_progress` counts a study's stored cells from the files and the store, running nothing.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from harness.analysis.gains import ANALYSIS_KIND as FIXED_RANDOMNESS
from harness.analysis.representations import ANALYSIS_KIND as REPRESENTATIONS
from harness.analysis.representations import RepresentationsRequest, SAESettings, run_representations
from harness.analysis.representations import check_request as check_representations
from harness.analysis.study import StudyRequest
from harness.analysis.study import run_study as run_fixed_randomness
from harness.attacks.catalog import parse_attack_spec
from harness.classifiers.sources import DEFAULT_CLASSIFIER
from harness.core.artifacts import ArtifactCache
from harness.core.entry import DefenseEntry, Kind, defense_registry
from harness.core.errors import MissingArtifactError, UsageError
from harness.core.registry import Registry, suggest
from harness.data import dataset_info
from harness.data.disk import read_meta
from harness.core.paths import data_root
from harness.evaluation.building import own_network
from harness.evaluation.planning import Plan, classifier_network_id, plan_request
from harness.evaluation.runner import DEFAULT_ATTACKS, DEFAULT_PROTOCOLS, CellOutcome, RunRequest, check_request, run_grid
from harness.results.queries import analysis_key, load_analyses

__all__ = ["STUDIES_ENV", "SECTIONS", "ANALYSIS_KINDS", "Grid", "AnalysisSpec", "Render", "Study", "StudyProgress",
           "study_dirs", "load_study", "load_studies", "find_study", "with_run_settings", "plan_study", "run_study",
           "run_analyses", "study_progress"]

log = logging.getLogger(__name__)
STUDIES_ENV = "HARNESS_STUDIES"
#: where ``harness report`` shows what a study renders: section -> how the report names it
SECTIONS = {
    "leaderboard": "the leaderboard tables (tables/*.md|.tex, index.html)",
    "image-quality": "Image quality of purified images",
    "colour-shift": "Accuracy drop under colour shift",
    "corruptions": "Colour corruptions (figure)",
    "transfer": "Defense transfer across datasets",
    "fixed-vs-fresh": "Robust gain under fixed vs fresh randomness",
    "compression": "Compression rate vs robust gain (scatter)",
    "representations": "Representations (representations.md)",
    "robust-training": "Robust training (robust-training.md)",
}
_STUDY_KEYS = {"name": str, "title": str, "description": str, "paper": str, "grid": list, "analysis": list,
               "render": list}
_GRID_KEYS = {"defenses": list, "dataset": str, "classifier": str, "threat": str, "eps": list, "attacks": list,
              "protocols": list, "n": int, "seeds": list, "variants": list, "variant_seed": int, "preset": str,
              "train_datasets": list, "train_classifier": str, "train_seed": int, "train_seeds": list,
              "options": dict}
_TYPE_NAMES = {str: "a string", int: "a whole number", float: "a number", list: "a list", dict: "a table"}
_RENDER_KEYS = {"label": str, "caption": str, "section": str}
#: per analysis kind: its keys and their types (``kind`` besides)
ANALYSIS_KINDS: dict[str, dict[str, type]] = {
    FIXED_RANDOMNESS: {"defense": str, "dataset": str, "classifier": str, "preset": str, "options": dict, "n": int,
                       "seed": int, "eps": str, "steps": int},
    REPRESENTATIONS: {"defenses": list, "dataset": str, "classifier": str, "preset": str, "options": dict,
                      "train_seeds": list, "train_seed": int, "n": int, "train_n": int, "latents": int, "k": int,
                      "sae_steps": int, "sae_lr": float, "seed": int},
}


@dataclass(frozen=True)
class Grid:
    """One ``[[grid]]``: the runs it makes (one per training seed)."""

    requests: tuple[RunRequest, ...]


@dataclass(frozen=True)
class AnalysisSpec:
    """One ``[[analysis]]``: its kind and the requests it makes (one per entry setting)."""

    kind: str
    requests: tuple[StudyRequest | RepresentationsRequest, ...]


@dataclass(frozen=True)
class Render:
    """A table, figure or section the study renders, and the report section that shows it."""

    label: str
    caption: str
    section: str


@dataclass(frozen=True)
class Study:
    """A parsed, validated study file."""

    name: str
    title: str
    description: str
    paper: str
    grids: tuple[Grid, ...]
    analyses: tuple[AnalysisSpec, ...] = ()
    renders: tuple[Render, ...] = ()
    path: Path | None = field(default=None, compare=False)

    def requests(self) -> list[RunRequest]:
        """Every run of the study's grids, in file order."""
        return [r for grid in self.grids for r in grid.requests]


# -- finding and loading ----------------------------------------------------------------------------
def study_dirs(studies: str | os.PathLike | None = None) -> list[Path]:
    """Where study files are looked up, first match wins: ``studies`` (``--studies DIR``), else
    ``$HARNESS_STUDIES``, else ``leaderboards/studies`` of the checkout this harness is imported from and
    of the working directory."""
    chosen = studies or os.environ.get(STUDIES_ENV)
    if chosen:
        return [Path(chosen).expanduser()]
    checkout = Path(__file__).resolve().parents[2] / "leaderboards" / "studies"
    here = Path.cwd() / "leaderboards" / "studies"
    return list(dict.fromkeys([checkout, here]))


def _folder(studies: str | os.PathLike | None) -> Path:
    dirs = study_dirs(studies)
    for folder in dirs:
        if folder.is_dir():
            return folder
    if studies or os.environ.get(STUDIES_ENV):
        raise UsageError(f"studies folder {dirs[0]} does not exist")
    return dirs[0]


def load_studies(studies: str | os.PathLike | None = None, *, registry: Registry[DefenseEntry] | None = None
                 ) -> list[Study]:
    """Every study in the studies folder (see :func:`study_dirs`), by name, each validated."""
    folder = _folder(studies)
    return [load_study(path, registry=registry) for path in sorted(folder.glob("*.toml"))]


def find_study(name: str, studies: str | os.PathLike | None = None, *,
               registry: Registry[DefenseEntry] | None = None) -> Study:
    """The study ``name`` (a file ``<name>.toml`` in the studies folder, or a path to a study file)."""
    if name.endswith(".toml") and Path(name).is_file():
        return load_study(Path(name), registry=registry)
    folder = _folder(studies)
    path = folder / f"{name}.toml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.toml"))
        raise UsageError(f"unknown study {name!r}{suggest(name, names)}; valid: {', '.join(names) or '(none)'} "
                         f"(in {folder})")
    return load_study(path, registry=registry)


def load_study(path: Path, *, registry: Registry[DefenseEntry] | None = None) -> Study:
    """Parse and validate the study file ``path``."""
    registry = registry if registry is not None else defense_registry()
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read study {path}: {' '.join(str(exc).split())}") from None
    where = f"study {Path(path).name}"
    _check_keys(raw, _STUDY_KEYS, where)
    for key in ("name", "title", "paper", "grid"):
        if key not in raw:
            raise UsageError(f"{where} has no {key!r}; a study needs name, title, paper and at least one [[grid]]")
    if raw["name"] != Path(path).stem:
        raise UsageError(f"{where} is named {raw['name']!r}: a study's name must be its file's stem "
                         f"({Path(path).stem!r})")
    grids = tuple(_grid(g, f"{where}, grid {i + 1}", registry) for i, g in enumerate(_tables(raw, "grid", where)))
    analyses = tuple(_analysis(a, f"{where}, analysis {i + 1}", registry)
                     for i, a in enumerate(_tables(raw, "analysis", where)))
    renders = tuple(_render(r, f"{where}, render {i + 1}") for i, r in enumerate(_tables(raw, "render", where)))
    return Study(raw["name"], raw["title"], raw.get("description", ""), raw["paper"], grids, analyses, renders,
                 Path(path))


def _tables(raw: Mapping[str, Any], key: str, where: str) -> list[Mapping[str, Any]]:
    tables = raw.get(key, [])
    if not all(isinstance(t, Mapping) for t in tables):
        raise UsageError(f"{where}: {key!r} must be an array of tables ([[{key}]])")
    if key == "grid" and not tables:
        raise UsageError(f"{where} has no [[grid]]")
    return tables


def _check_keys(table: Mapping[str, Any], valid: Mapping[str, type], where: str) -> None:
    """Every key of ``table`` is one of ``valid``, of its type (an int is a valid float)."""
    for key, value in table.items():
        if key not in valid:
            raise UsageError(f"{where}: unknown key {key!r}{suggest(key, valid)}; valid: {', '.join(valid)}")
        kind = valid[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise UsageError(f"{where}: {key!r} must be {_TYPE_NAMES[kind]}, got {value!r}")


def _seeds(table: Mapping[str, Any], where: str) -> tuple[int, ...]:
    if "train_seed" in table and "train_seeds" in table:
        raise UsageError(f"{where}: give train_seed or train_seeds, not both")
    seeds = table.get("train_seeds", [table.get("train_seed", 0)])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UsageError(f"{where}: train_seeds must be a non-empty list of whole numbers, got {seeds!r}")
    return tuple(seeds)


def _strings(table: Mapping[str, Any], key: str, where: str, default: Sequence[str]) -> tuple[str, ...]:
    values = table.get(key, list(default))
    if not all(isinstance(v, str) for v in values):
        raise UsageError(f"{where}: {key!r} must be a list of strings, got {values!r}")
    return tuple(values)


def _grid(table: Mapping[str, Any], where: str, registry: Registry[DefenseEntry]) -> Grid:
    _check_keys(table, _GRID_KEYS, where)
    if "defenses" not in table:
        raise UsageError(f"{where} has no 'defenses'; valid: {', '.join(registry.names())}")
    seeds = table.get("seeds", [0])
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UsageError(f"{where}: 'seeds' must be a list of whole numbers, got {seeds!r}")
    attacks = (tuple(_attack(spec, where) for spec in _strings(table, "attacks", where, ()))
               if "attacks" in table else DEFAULT_ATTACKS)
    common = dict(
        defenses=_strings(table, "defenses", where, ()), dataset=table.get("dataset", "cifar10"),
        classifier=table.get("classifier", DEFAULT_CLASSIFIER), threat=table.get("threat", "linf"),
        eps=_strings(table, "eps", where, ("8/255",)), attacks=attacks,
        protocols=_strings(table, "protocols", where, DEFAULT_PROTOCOLS), n=table.get("n", 512),
        seeds=tuple(seeds), variants=_strings(table, "variants", where, ("clean",)),
        variant_seed=table.get("variant_seed", 0), preset=table.get("preset"),
        train_datasets=tuple(None if d == "same" else d for d in _strings(table, "train_datasets", where, ("same",))),
        train_classifier=table.get("train_classifier"), options=dict(table.get("options", {})))
    requests = tuple(RunRequest(**common, train_seed=seed) for seed in _seeds(table, where))
    for request in requests:
        _check(lambda: check_request(request, registry, classifiers=False), where)
    return Grid(requests)


def _attack(spec: str, where: str) -> dict[str, Any]:
    try:
        return parse_attack_spec(spec)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _check(check: Callable[[], Any], where: str) -> None:
    """Run ``check``; a :class:`UsageError` is prefixed with ``where``. A dataset that is not stored here
    (and not in a mirror) leaves only the checks that need its data (the test split's size) undone."""
    try:
        check()
    except MissingArtifactError as exc:
        log.debug("%s: not checked against its data: %s", where, exc)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _analysis(table: Mapping[str, Any], where: str, registry: Registry[DefenseEntry]) -> AnalysisSpec:
    kind = table.get("kind")
    if kind not in ANALYSIS_KINDS:
        raise UsageError(f"{where}: unknown analysis kind {kind!r}{suggest(str(kind), ANALYSIS_KINDS)}; "
                         f"valid: {', '.join(ANALYSIS_KINDS)}")
    args = {k: v for k, v in table.items() if k != "kind"}
    _check_keys(args, ANALYSIS_KINDS[kind], f"{where} ({kind})")
    if kind == FIXED_RANDOMNESS:
        return AnalysisSpec(kind, (_fixed_randomness(args, where, registry),))
    return AnalysisSpec(kind, _representations(args, where, registry))


def _fixed_randomness(args: Mapping[str, Any], where: str, registry: Registry[DefenseEntry]) -> StudyRequest:
    if "defense" not in args:
        raise UsageError(f"{where}: a fixed-randomness analysis names its 'defense' (a stochastic purifier)")
    name = args["defense"]
    if name not in registry:
        valid = [i.value.name for i in registry.items() if i.value.kind is Kind.PURIFIER]
        raise UsageError(f"{where}: unknown defense {name!r}{suggest(name, valid)}; valid: {', '.join(valid)}")
    entry = registry.get(name)
    if entry.kind is not Kind.PURIFIER:
        raise UsageError(f"{where}: defense {name!r} is a {entry.kind.value}: the fixed-randomness analyses "
                         f"study a purifier")
    request = StudyRequest(defense=name, dataset=args.get("dataset", "cifar10"),
                           classifier=args.get("classifier", DEFAULT_CLASSIFIER), preset=args.get("preset"),
                           options=dict(args.get("options", {})), n=args.get("n", 32), seed=args.get("seed", 0),
                           eps=args.get("eps", "8/255"), attack={"name": "pgd", "steps": args.get("steps", 20)})
    _check(lambda: (dataset_info(request.dataset), entry.check_dataset(request.dataset),
                    entry.resolve_preset(request.preset), entry.check_options(request.options)), where)
    return request


def _representations(args: Mapping[str, Any], where: str, registry: Registry[DefenseEntry]
                     ) -> tuple[RepresentationsRequest, ...]:
    sae = SAESettings(latents=args.get("latents", 1024), k=args.get("k", 32), steps=args.get("sae_steps", 2000),
                      lr=float(args.get("sae_lr", 1e-3)), seed=args.get("seed", 0))
    requests = tuple(RepresentationsRequest(
        defenses=_strings(args, "defenses", where, ()), dataset=args.get("dataset", "cifar10"),
        classifier=args.get("classifier", DEFAULT_CLASSIFIER), preset=args.get("preset"),
        options=dict(args.get("options", {})), n=args.get("n", 512), train_n=args.get("train_n", 10000), sae=sae,
        train_seed=seed) for seed in _seeds(args, where))
    for request in requests:
        _check(lambda: check_representations(request, registry), where)
    return requests


def _render(table: Mapping[str, Any], where: str) -> Render:
    _check_keys(table, _RENDER_KEYS, where)
    section = table.get("section", "leaderboard")
    if section not in SECTIONS:
        raise UsageError(f"{where}: unknown section {section!r}{suggest(section, SECTIONS)}; "
                         f"valid: {', '.join(SECTIONS)}")
    if "label" not in table:
        raise UsageError(f"{where} has no 'label' (e.g. \"Table 1\")")
    return Render(table["label"], table.get("caption", ""), section)


# -- running and counting ---------------------------------------------------------------------------
def with_run_settings(request: RunRequest, **settings: Any) -> RunRequest:
    """``request`` with how-to-run settings (``batch_size``, ``force``, ``allow_train``, ``data_root``,
    ``artifact_root``, ``progress``, ``executor``, ``address``, ``device``) replaced: they never change a
    cell's key, except that a GPU device is keyed (its numbers differ from the CPU's)."""
    allowed = {"batch_size", "force", "allow_train", "data_root", "artifact_root", "progress", "executor", "address",
               "device"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise UsageError(f"not a run setting: {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}")
    return replace(request, **settings)


def plan_study(study: Study, db: str | Engine | None = None, registry: Registry[DefenseEntry] | None = None,
               **settings: Any) -> Plan:
    """The plan (:func:`harness.evaluation.planning.plan_request`) of every grid of ``study``, each cell
    once. A grid whose dataset is not here is left out, and named in the plan's ``problems``."""
    plan = Plan()
    for number, request in enumerate(study.requests(), 1):
        try:
            plan = plan + plan_request(with_run_settings(request, **settings), registry, db=db)
        except MissingArtifactError as exc:
            plan = plan + Plan(problems=[f"study {study.name}, run {number} ({','.join(request.defenses)} on "
                                         f"{request.dataset}) not planned: {exc}"])
    return plan


def run_study(study: Study, engine: Engine, registry: Registry[DefenseEntry] | None = None,
              **settings: Any) -> tuple[list[CellOutcome], list[str]]:
    """Compute what ``study`` is missing: every grid (stored cells are skipped), then every analysis not
    stored yet (:func:`run_analyses`). Returns the cells' outcomes and the keys of the analyses computed
    now. ``settings`` are run settings (:func:`with_run_settings`)."""
    requests = [with_run_settings(r, **settings) for r in study.requests()]
    for request in requests:  # bad input (e.g. a classifier file that is gone) fails before anything runs
        check_request(request, registry)
    outcomes = [o for request in requests for o in run_grid(request, engine, registry)]
    return outcomes, run_analyses(study, engine, registry, **settings)


def run_analyses(study: Study, engine: Engine, registry: Registry[DefenseEntry] | None = None,
                 **settings: Any) -> list[str]:
    """Run every analysis of ``study`` that the store behind ``engine`` does not hold yet; the keys of
    the records written."""
    keys: list[str] = []
    for spec in study.analyses:
        for request in spec.requests:
            keys += _run_analysis(spec.kind, _analysis_settings(request, settings), engine, registry)
    return keys


def _analysis_settings(request: StudyRequest | RepresentationsRequest, settings: Mapping[str, Any]
                       ) -> StudyRequest | RepresentationsRequest:
    shared = {k: settings[k] for k in ("data_root", "artifact_root", "progress") if k in settings}
    return replace(request, **shared)


def _run_analysis(kind: str, request: StudyRequest | RepresentationsRequest, engine: Engine,
                  registry: Registry[DefenseEntry] | None) -> list[str]:
    """Run the analysis ``request`` unless it is stored; the keys of the records written."""
    if kind == FIXED_RANDOMNESS:
        assert isinstance(request, StudyRequest)
        if _fixed_randomness_done(request, engine):
            log.info("skipping stored fixed-randomness analysis of %s", request.defense)
            return []
        return [run_fixed_randomness(request, engine)]
    assert isinstance(request, RepresentationsRequest)
    missing = tuple(d for d in request.defenses if not _representation_done(request, d, engine, registry))
    if not missing:
        log.info("skipping stored representation analyses of %s", ", ".join(request.defenses))
        return []
    return run_representations(replace(request, defenses=missing), engine, registry)


def _test_fingerprint(dataset: str, root: str | None) -> str | None:
    meta = read_meta(data_root(root), dataset)
    return meta["splits"]["test"]["fingerprint"] if meta else None


def _fixed_randomness_done(request: StudyRequest, engine: Engine) -> bool:
    """Whether the store holds this analysis: its setting (the record's key, as
    :func:`harness.analysis.study.run_study` stores it) with this ``n``, seed, eps and attack."""
    entry = defense_registry().get(request.defense)
    info = dataset_info(request.dataset)
    network = classifier_network_id(request.classifier, info, data_root=request.data_root,
                                    artifact_root=request.artifact_root)
    fingerprint = _test_fingerprint(request.dataset, request.data_root)
    if network is None or fingerprint is None:
        return False
    meta = {"defense": entry.name, "version": entry.version, "preset": entry.resolve_preset(request.preset) or "",
            "options": entry.check_options(request.options), "dataset": info.name, "classifier": network,
            "fingerprint": fingerprint}
    key = analysis_key(FIXED_RANDOMNESS, meta)
    with Session(engine) as session:
        for row in load_analyses(session, FIXED_RANDOMNESS):
            result = row.result or {}
            if (row.key == key and result.get("n") == request.n and result.get("seed") == request.seed
                    and result.get("eps") == request.eps
                    and (result.get("attack") or {}).get("steps") == request.attack.get("steps")):
                return True
    return False


def _representation_done(request: RepresentationsRequest, name: str, engine: Engine,
                         registry: Registry[DefenseEntry] | None) -> bool:
    """Whether the store holds entry ``name``'s row of this representation analysis (its setting, data,
    subset sizes and SAE settings; the network as :func:`harness.analysis.networks.classifier_network`
    names it: the base classifier for ``none``, the entry's trained weights of ``train_seed`` otherwise)."""
    entry = (registry or defense_registry()).get(name)
    info = dataset_info(request.dataset)
    preset = entry.resolve_preset(request.preset)
    if entry.uses_base_classifier:
        network = classifier_network_id(request.classifier, info, data_root=request.data_root,
                                        artifact_root=request.artifact_root)
    elif entry.train is not None:
        network = own_network(entry, preset, info, ArtifactCache(request.artifact_root, allow_train=False),
                              data_root=request.data_root, progress=False, seed=request.train_seed).id
    else:
        network = None
    fingerprint = _test_fingerprint(request.dataset, request.data_root)
    if network is None or fingerprint is None:
        return False
    expected = {"defense": entry.name, "version": entry.version, "preset": preset or "",
                "options": entry.select_options(request.options), "network": network,
                "train_seed": request.train_seed, "dataset": info.name, "fingerprint": fingerprint,
                "n": request.n, "train_n": request.train_n,
                "sae": {"latents": request.sae.latents, "k": request.sae.k, "steps": request.sae.steps,
                        "batch_size": request.sae.batch_size, "lr": request.sae.lr, "seed": request.sae.seed}}
    with Session(engine) as session:
        return any(all((row.config or {}).get(k) == v for k, v in expected.items())
                   for row in load_analyses(session, REPRESENTATIONS))


@dataclass(frozen=True)
class StudyProgress:
    """How much of a study is stored: its keyed cells, how many are done, and why it could not be
    counted (e.g. its dataset is not here)."""

    study: Study
    cells: int
    done: int
    unknown: int = 0
    problem: str = ""


def study_progress(studies: Sequence[Study], engine: Engine,
                   registry: Registry[DefenseEntry] | None = None) -> list[StudyProgress]:
    """For each study, how many of its cells the store behind ``engine`` holds (planned from the study
    files, nothing run, built or loaded)."""
    out = []
    for study in studies:
        try:
            plan = plan_study(study, engine, registry, progress=False)
        except UsageError as exc:  # e.g. a dataset that is not here
            out.append(StudyProgress(study, 0, 0, problem=str(exc)))
            continue
        keyed = [c for c in plan.cells if c.key is not None]
        out.append(StudyProgress(study, len(keyed), sum(1 for c in keyed if c.done), len(plan.cells) - len(keyed),
                                 "; ".join(plan.problems)))
    return out

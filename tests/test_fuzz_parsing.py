"""Property-based fuzzing of input parsing: any text gives a valid value or a one-line UsageError, never
another exception (eps, attack specs, variants, --option values, and the runner's checks of a request)."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

pytest.importorskip("hypothesis", reason="hypothesis is in the dev extra")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.attacks.base import Attack
from harness.attacks.catalog import build_attack, parse_attack_spec
from harness.cli.options import parse_options
from harness.core.entry import Defense, DefenseEntry, Kind, Option
from harness.core.errors import UsageError
from harness.core.threat import Epsilon, ThreatModel
from harness.data.variants import parse_variant
from harness.evaluation.runner import RunRequest, _validate

from conftest import write_imagefolder


FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])

NUMBERS = st.sampled_from(["0", "1", "-1", "8/255", "8/0", "0/0", "1e400", "-0", "nan", "inf", "-inf", "1e-400",
                           "255/8", "2.5", "3.0", "1_000", "0x10", "", " ", "1/2/3", "9" * 400, "1" + "0" * 5000,
                           "10" * 200 + "/1", "true", "false", "maybe", "²", "３"])
TEXT = st.text(max_size=30)
ATOM = NUMBERS | TEXT


def one_line(exc: UsageError) -> bool:
    return "\n" not in str(exc) and str(exc).strip() != ""


def _eps_text() -> st.SearchStrategy[str]:
    return ATOM | st.builds(lambda a, b: f"{a}/{b}", ATOM, ATOM) | st.floats().map(repr)


@FUZZ
@given(_eps_text())
def test_epsilon(text):
    try:
        eps = Epsilon.parse(text)
    except UsageError as exc:
        assert one_line(exc)
    else:
        assert eps.value >= 0 and eps.value < float("inf") and eps.text == text.strip()


KEYS = st.sampled_from(["steps", "step_size", "eot", "random_start", "version", "batch_size", "restarts",
                        "iterations", "targets", "queries", "threat", "name", "stepz", ""]) | TEXT
NAMES = st.sampled_from(["pgd", "PGD", "autoattack", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square", "fgsm", ""])


VALUES = st.integers(-2, 30).map(str) | st.sampled_from(["true", "false", "standard", "rand", "0.01"]) | ATOM


def _attack_spec() -> st.SearchStrategy[str]:
    pair = st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES) | TEXT
    structured = st.builds(lambda n, items: f"{n}:{','.join(items)}", NAMES, st.lists(pair, max_size=4))
    return structured | NAMES | TEXT


@FUZZ
@given(_attack_spec(), st.sampled_from(["linf", "l2"]), st.sampled_from(["0", "8/255", "0.5", "1"]))
def test_attack_spec(spec, norm, eps):
    try:
        attack = build_attack(parse_attack_spec(spec), ThreatModel(norm, Epsilon.parse(eps)))
    except UsageError as exc:
        assert one_line(exc)
    else:
        assert isinstance(attack, Attack) and isinstance(attack.label(), str)


def _variant() -> st.SearchStrategy[str]:
    kinds = st.sampled_from(["clean", "colored", "corrupt", "corupt", ""])
    args = st.sampled_from(["brightness", "contrast", "saturate", "blur"]) | NUMBERS
    return st.builds(lambda k, a: ":".join([k, *a]), kinds, st.lists(args, max_size=3)) | TEXT


@FUZZ
@given(_variant())
def test_variant(name):
    try:
        kind, args = parse_variant(name)
    except UsageError as exc:
        assert one_line(exc)
    else:
        assert kind in ("clean", "colored", "corrupt") and isinstance(args, tuple)


@FUZZ
@given(st.lists(st.builds(lambda k, v: f"{k}={v}", TEXT, ATOM) | TEXT, max_size=4))
def test_options(values):
    try:
        options = parse_options(tuple(values))
    except UsageError as exc:
        assert one_line(exc)
    else:
        assert all(isinstance(k, str) and k == k.strip() and k for k in options)


ENTRY = DefenseEntry(name="fuzz", version="1", kind=Kind.CLASSIFIER, paper="-", citation="-",
                     build=lambda ctx: Defense(torch.nn.Flatten()),
                     options=(Option("tstar", float, "a float option"), Option("sampler", str, "one of two",
                                                                              choices=("ddpm", "ddim"))))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Iterator[str]:
    """A tiny 'cifar10' (80 test images), imported once for the module; no mirror to import others from."""
    from harness.data import import_dataset

    tmp = tmp_path_factory.mktemp("fuzz-data")
    import_dataset("cifar10", write_imagefolder(tmp / "imagefolder", per_class=8), tmp / "root", progress=False)
    with pytest.MonkeyPatch.context() as env:
        env.delenv("HARNESS_DATA_MIRROR", raising=False)
        yield str(tmp / "root")


#: a valid request; the fuzzed one replaces up to three of its fields
VALID = dict(defenses=("fuzz",), dataset="cifar10", threat="linf", eps=("8/255",), attacks=({"name": "pgd"},),
             protocols=("adaptive",), variants=("clean",), n=4, batch_size=4, seeds=(0,), options={},
             train_datasets=(None,))
COUNTS = st.integers(-3, 100) | st.sampled_from([10 ** 30, 2 ** 63, True, 2.5, "4"])
FIELDS = {
    "dataset": st.sampled_from(["cifar1", "mnist", "imagenet", ""]) | TEXT,
    "threat": st.sampled_from(["l2", "l1", "Linf"]) | TEXT,
    "eps": st.lists(_eps_text(), max_size=3).map(tuple),
    "attacks": st.lists(_attack_spec().map(lambda spec: _spec_or_text(spec)), max_size=2).map(tuple),
    "protocols": st.lists(st.sampled_from(["adaptive", "non-adaptive", "bpda", "adaptive-eot", "adaptiv"]) | TEXT,
                          max_size=2).map(tuple),
    "variants": st.lists(_variant(), max_size=2).map(tuple),
    "n": COUNTS, "batch_size": COUNTS,
    "seeds": st.lists(st.integers(-2 ** 64, 2 ** 64), max_size=2).map(tuple),
    "options": st.dictionaries(st.sampled_from(["tstar", "sampler", "stepz"]) | TEXT,
                               st.sampled_from([0.2, 1, True, "ddim", "ddpm", "x", float("nan")]), max_size=2),
    "train_datasets": st.sampled_from([(), ("cifar10",), (None, "svhn"), (None, "mnist")]),
}


def _request(data_root: str) -> st.SearchStrategy[RunRequest]:
    fields = st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)
    changes = fields.flatmap(lambda names: st.fixed_dictionaries({name: FIELDS[name] for name in names}))
    return changes.map(lambda change: RunRequest(**{**VALID, **change, "data_root": data_root}))


def _spec_or_text(spec: str) -> dict:
    """The params of ``spec``, or ``{"name": spec}`` when it does not parse (the runner gets dicts)."""
    try:
        return parse_attack_spec(spec)
    except UsageError:
        return {"name": spec}


def test_validate(data_root):
    @FUZZ
    @given(_request(data_root))
    def check(request):
        try:
            protocols, threats = _validate(request, [ENTRY])
        except UsageError as exc:
            assert one_line(exc)
        else:
            assert protocols and threats and 1 <= request.n <= 80 and request.batch_size >= 1

    check()

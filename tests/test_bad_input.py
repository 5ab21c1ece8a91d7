"""Bad input through the command line: a one-line error naming the valid choices, never a traceback, and
nothing stored changes (the results store row for row, files byte for byte). Tiny data only."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sqlite3
import tarfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save
from sqlalchemy import select
from sqlalchemy.orm import Session

from conftest import serve
from harness.cli import main
from harness.results import open_db
from harness.results.schema import SCHEMA_VERSION, StoreInfo

TABLES = ("runs", "cells", "samples", "analyses", "claims", "store_info")
PAYLOAD_MARK = "pwned-by-pickle"


def invoke(*args: str) -> str:
    """Run ``harness ARGS`` in-process, expecting it to fail with one line; return that line."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert result.output.rstrip().splitlines()[-1] == errors[0], result.output
    return errors[0]


def rows(db: Path) -> dict[str, list[tuple]]:
    """Every row of every table of the store, read without opening it through harness."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_args(db: Path, classifier: str, /, **override: str) -> list[str]:
    """``harness run`` of one tiny cell; ``override`` replaces an option (``n="0"``) or adds one."""
    options = {"defense": "none", "classifier": classifier, "n": "4", "attack": "pgd:steps=1",
               "protocol": "adaptive", "db": str(db)}
    options.update(override)
    return ["run", "--no-progress"] + [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", v)]


@pytest.fixture()
def store(tiny_cifar, classifier_file, tmp_path) -> Path:
    """A results store that holds one finished cell."""
    db = tmp_path / "r.db"
    result = CliRunner().invoke(main, run_args(db, classifier_file))
    assert result.exit_code == 0, result.output
    assert [r[0] for r in rows(db)["cells"]] and len(rows(db)["samples"]) == 4
    return db


def _classifier_root() -> Path:
    from harness.core.paths import artifact_root

    return artifact_root() / "classifier"


# --- names, numbers, options, empty axes ----------------------------------------------------------------

CASES = [
    # names: the valid choices, and the closest one
    ({"defense": "nonee"}, "unknown defense 'nonee' (did you mean 'none'?); valid: "),
    ({"dataset": "cifar1"}, "unknown dataset 'cifar1' (did you mean 'cifar10'?); valid: cifar10, cifar100"),
    ({"attack": "pgdd"}, "unknown attack 'pgdd' (did you mean 'pgd'?); valid: apgd-ce"),
    ({"protocol": "adaptiv"}, "unknown protocol 'adaptiv' (did you mean 'adaptive'?); valid: adaptive, "),
    ({"variant": "colord"}, "unknown dataset variant 'colord' (did you mean 'colored'?); valid: clean, colored"),
    ({"classifier": "trainedd:small"}, "cannot read classifier source 'trainedd:small' (did you mean "
                                       "'trained:small'?); valid forms: file:<path>"),
    ({"classifier": "trained:smal"}, "unknown classifier preset 'smal' (did you mean 'small'?); valid: tiny, small"),
    ({"option": "tstar=1"}, "no defense of this run has an option 'tstar'; valid options: none: (none)"),
    ({"option": "tstar"}, "--option 'tstar' must look like key=value"),
    # numbers
    ({"eps": "abc"}, "cannot read epsilon 'abc'; write it as a fraction like 8/255 or a number like 0.0314"),
    ({"eps": "8/0"}, "epsilon '8/0' divides by zero"),
    ({"eps": "-1"}, "epsilon must be a finite number >= 0 (like 8/255), got '-1'"),
    ({"eps": "nan"}, "epsilon must be a finite number >= 0 (like 8/255), got 'nan'"),
    ({"eps": "inf"}, "epsilon must be a finite number >= 0 (like 8/255), got 'inf'"),
    ({"eps": "1.5"}, "linf epsilon 1.5 is above 1, the whole [0, 1] pixel range; valid: 0 to 1"),
    ({"threat": "l2", "eps": "56"}, "l2 epsilon 56 is above 55.43, the diameter sqrt(3*32*32) of the [0, 1] "
                                    "image cube of cifar10; valid: 0 to 55.43"),
    ({"n": "0"}, "--n must be a whole number >= 1, got 0"),
    ({"n": "81"}, "--n 81 is more than the 80 images of the cifar10 test split; valid: 1 to 80"),
    ({"batch_size": "0"}, "--batch-size must be a whole number >= 1 or auto, got 0"),
    # attack options
    ({"attack": "pgd:steps=abc"}, "bad options for attack 'pgd': steps must be a whole number >= 0, got 'abc'"),
    ({"attack": "pgd:steps=-1"}, "bad options for attack 'pgd': steps must be a whole number >= 0, got -1"),
    ({"attack": "pgd:steps=2.5"}, "bad options for attack 'pgd': steps must be a whole number >= 0, got 2.5"),
    ({"attack": "pgd:eot=0"}, "bad options for attack 'pgd': eot must be a whole number >= 1, got 0"),
    ({"attack": "pgd:step_size=0"}, "bad options for attack 'pgd': step_size must be a finite number > 0, got 0"),
    ({"attack": "pgd:step_size=-0.1"}, "step_size must be a finite number > 0, got -0.1"),
    ({"attack": "pgd:step_size=nan"}, "step_size must be a finite number > 0, got nan"),
    ({"attack": "pgd:random_start=maybe"}, "random_start must be true or false, got 'maybe'"),
    ({"attack": "autoattack:version=foo"}, "bad options for attack 'autoattack': unknown AutoAttack version 'foo'; "
                                           "valid: standard, rand, plus"),
    ({"attack": "autoattack:version=rnd"}, "unknown AutoAttack version 'rnd' (did you mean 'rand'?)"),
    ({"attack": "pgd:stepz=3"}, "bad options for attack 'pgd': no option 'stepz' (did you mean 'steps'?); "
                                "valid: steps, step_size, random_start, eot"),
    ({"attack": "apgd-ce:restart=2"}, "bad options for attack 'apgd-ce': no option 'restart' (did you mean "
                                      "'restarts'?); valid: restarts, iterations, batch_size"),
    ({"attack": "pgd:steps"}, "attack option 'steps' must look like key=value"),
]


@pytest.mark.parametrize("override,message", CASES, ids=[" ".join(f"{k}={v}" for k, v in o.items()) for o, _ in CASES])
def test_bad_run_input_is_one_line_and_stores_nothing(store, classifier_file, override, message):
    before = rows(store)
    assert message in invoke(*run_args(store, classifier_file, **override))
    assert rows(store) == before


@pytest.mark.parametrize("option,message", [
    ("eps", "--eps names no value; give at least one, like 8/255 or 0.0314"),
    ("defense", "no defense given; valid: "),
    ("protocol", "--protocol names no value; valid: adaptive, adaptive-eot, bpda, non-adaptive"),
    ("variant", "--variant names no value; valid: clean, colored, corrupt:<name>:<severity>"),
    ("train_dataset", "--train-dataset names no value; valid: same, cifar10"),
])
def test_empty_axis_is_an_error_before_any_training(store, option, message):
    before = rows(store)
    # an untrained classifier: had the run gone on, it would train it first
    assert message in invoke(*run_args(store, "trained:tiny", **{option: ","}))
    assert rows(store) == before and not _classifier_root().exists()


# --- result stores -------------------------------------------------------------------------------------

def test_db_in_a_missing_folder(store, classifier_file, tmp_path):
    before = rows(store)
    missing = tmp_path / "nowhere" / "r.db"
    message = invoke(*run_args(missing, classifier_file))
    assert f"results database {missing}: the folder {missing.parent} does not exist" in message
    assert not missing.parent.exists() and rows(store) == before
    assert "is a folder" in invoke("report", "--db", str(tmp_path), "--out", str(tmp_path / "out"))


def test_db_that_is_not_a_database(store, classifier_file, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes, not a database\n" * 20)
    before = text.read_bytes()
    for args in (run_args(text, classifier_file), ["report", "--db", str(text), "--out", str(tmp_path / "o")]):
        message = invoke(*args)
        assert f"cannot open results database {text}: file is not a database" in message
        assert text.read_bytes() == before
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("url,message", [
    ("foo://x", "unknown database URL scheme 'foo'; valid: a file path, or a SQLAlchemy URL (sqlite, postgresql"),
    ("sqlit:///r.db", "unknown database URL scheme 'sqlit' (did you mean 'sqlite'?)"),
    ("://x", "cannot read the database URL"),
])
def test_unknown_db_url(store, classifier_file, url, message):
    before = rows(store)
    assert message in invoke(*run_args(store, classifier_file, db=url))
    assert rows(store) == before


def _set_version(db: Path, value: str | None) -> None:
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute("DELETE FROM store_info WHERE key = 'schema_version'")
        if value is not None:
            con.execute("INSERT INTO store_info (key, value) VALUES ('schema_version', ?)", (value,))


def test_store_of_a_newer_harness_is_refused_unchanged(store, classifier_file, tmp_path):
    newer = tmp_path / "newer.db"
    open_db(str(newer)).dispose()
    _set_version(newer, str(SCHEMA_VERSION + 1))
    before = newer.read_bytes()
    for args in (run_args(newer, classifier_file), ["report", "--db", str(newer), "--out", str(tmp_path / "o")]):
        message = invoke(*args)
        assert (f"results database {newer} has schema version {SCHEMA_VERSION + 1}, newer than this harness"
                in message and f"(schema version {SCHEMA_VERSION}); upgrade harness to open it" in message)
        assert newer.read_bytes() == before


def test_store_records_its_schema_version_and_harness_0_1_stores_get_it(store):
    def version() -> str | None:
        with Session(engine) as session:
            return session.scalar(select(StoreInfo.value).where(StoreInfo.key == "schema_version"))

    engine = open_db(str(store))
    assert version() == str(SCHEMA_VERSION)
    engine.dispose()
    cells = rows(store)["cells"]
    for old in (None, "1"):  # harness 0.1 wrote no version; an older one is brought up to date
        _set_version(store, old)
        engine = open_db(str(store))
        assert version() == str(SCHEMA_VERSION) and rows(store)["cells"] == cells
        engine.dispose()


# --- files: dataset archives, classifier checkpoints, cached artifacts --------------------------------

def _tar_gz(folder: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as archive:
        archive.add(folder, arcname="cifar10")
    return target


def _data() -> Path:
    from harness.core.paths import data_root

    return data_root()


def test_truncated_dataset_archive(store, tiny_cifar, tmp_path):
    archive = _tar_gz(tiny_cifar, tmp_path / "cifar10.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    before, data = rows(store), files(_data())
    message = invoke("data", "import", "cifar10", str(archive))
    assert f"{archive} is a damaged or truncated archive" in message and "harness data fetch" in message
    assert rows(store) == before and files(_data()) == data


def test_archive_whose_images_are_not_images(store, tmp_path):
    archive = tmp_path / "fake.tar"
    with tarfile.open(archive, "w") as tar:
        for split in ("train", "test"):
            for name in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"):
                blob = b"<html>not an image</html>"
                info = tarfile.TarInfo(f"{split}/{name}/0.png")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    before, data = rows(store), files(_data())
    message = invoke("data", "import", "cifar10", str(archive))
    assert "cannot decode image train/airplane/0.png: not an image file" in message
    assert rows(store) == before and files(_data()) == data


def test_tampered_download_is_refused(store, tiny_cifar, tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    body = _tar_gz(tiny_cifar, tmp_path / "cifar-10-python.tar.gz").read_bytes()
    before, data = rows(store), files(_data())
    with serve({"/cifar-10-python.tar.gz": body}) as base:
        message = invoke("data", "fetch", "cifar10", "--url", f"{base}/cifar-10-python.tar.gz")
    assert (f"checksum mismatch for {base}/cifar-10-python.tar.gz: expected md5 c58f30108f718f92721af3b95e74349a, "
            f"got {hashlib.md5(body).hexdigest()}; the download was deleted and nothing was imported") in message
    assert rows(store) == before and files(_data()) == data


class _Payload:
    """Unpickling this creates a file: what a hostile checkpoint would run."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def _checkpoints(tmp_path: Path, classifier_file: str) -> dict[str, tuple[Path, str]]:
    """Bad checkpoint files, each with the message it must give."""
    good = Path(classifier_file).read_bytes()
    out = {}
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(os.urandom(64) + b"garbage" * 100)
    out["garbage safetensors"] = garbage, (f"{garbage} is not a readable safetensors file (Error while "
                                           f"deserializing header")
    short = tmp_path / "short.safetensors"
    short.write_bytes(good[: len(good) // 2])
    out["truncated safetensors"] = short, f"{short} is not a readable safetensors file"
    state = load_file(classifier_file)
    full = tmp_path / "full.pt"
    torch.save({"arch": "convnet-tiny", "num_classes": 10, "state_dict": state}, full)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    out["truncated pt"] = truncated, f"{truncated} is not a readable PyTorch checkpoint (PytorchStreamReader failed"
    garbage_pt = tmp_path / "garbage.pt"
    garbage_pt.write_bytes(b"\x80\x04garbage" * 50)
    out["garbage pt"] = garbage_pt, f"{garbage_pt} is not a readable PyTorch checkpoint"
    hostile = tmp_path / "hostile.pt"
    torch.save({"arch": "convnet-tiny", "num_classes": 10, "state_dict": state,
                "extra": _Payload(tmp_path / PAYLOAD_MARK)}, hostile)
    out["pickle payload"] = hostile, f"{hostile} is not a safe checkpoint: it holds the Python object"
    wrong = tmp_path / "wrong.pt"
    torch.save({"arch": "convnet-tiny", "num_classes": 10, "state_dict": {"nope": torch.zeros(1)}}, wrong)
    out["wrong state dict"] = wrong, (f"{wrong} does not fit architecture 'convnet-tiny': missing 35 keys "
                                      f"(normalize.mean, normalize.std, stem.weight, ...), unexpected 1 key (nope)")
    return out


@pytest.mark.parametrize("case", ["garbage safetensors", "truncated safetensors", "truncated pt", "garbage pt",
                                  "pickle payload", "wrong state dict"])
def test_bad_classifier_checkpoint(store, classifier_file, tmp_path, case):
    path, expected = _checkpoints(tmp_path, classifier_file)[case]
    before = rows(store)
    message = invoke(*run_args(store, classifier_file, classifier=str(path)))
    assert expected in message and "weights_only" not in message
    assert rows(store) == before and not (tmp_path / PAYLOAD_MARK).exists()


def test_payload_really_would_run(tmp_path):
    """The hostile checkpoint of the test above is hostile: unpickling it freely creates the file."""
    import pickle

    pickle.loads(pickle.dumps(_Payload(tmp_path / PAYLOAD_MARK))).close()
    assert (tmp_path / PAYLOAD_MARK).exists()


@pytest.mark.parametrize("weights,damage", [
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "is damaged (Error while deserializing header"),
    (save({"stem.weight": torch.zeros(1)}),
     "does not fit architecture 'convnet-tiny' (Error(s) in loading state_dict for ConvNet: size mismatch for "
     "stem.weight"),
], ids=["garbage", "other tensors"])
def test_damaged_cached_artifact(store, tiny_cifar, weights, damage):
    from harness.classifiers.sources import classifier_recipe
    from harness.core.artifacts import ArtifactCache
    from harness.data import dataset_info, load_split

    recipe = classifier_recipe("tiny", dataset_info("cifar10"), load_split("cifar10", "train").fingerprint, 0)
    folder = ArtifactCache().path_for("classifier", recipe)
    folder.mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(weights)
    (folder / "recipe.json").write_text("{}")
    before, cached = rows(store), files(folder)
    message = invoke("train", "classifier", "--preset", "tiny")
    assert f"cached artifact {folder} {damage}" in message
    assert "delete that folder and run again to retrain it" in message
    assert rows(store) == before and files(folder) == cached
    # a run finds the same damage before it records anything
    assert f"cached artifact {folder} {damage}" in invoke(*run_args(store, "trained:tiny"))
    assert rows(store) == before and files(folder) == cached


def test_bad_input_creates_no_results_db(tiny_cifar, classifier_file, tmp_path):
    """A new ``--db`` path stays absent when the request is refused."""
    db = tmp_path / "new.db"
    result = CliRunner().invoke(main, ["run", "--defense", "none", "--classifier", classifier_file, "--eps", "abc",
                                       "--db", str(db), "--no-progress"])
    assert result.exit_code != 0 and "cannot read epsilon 'abc'" in result.output
    assert not db.exists()

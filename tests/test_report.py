"""Tests of the reporter (harness.report): tables, escaping, CSV, HTML page, empty store, screenshot; the
stores of the module's fixtures on each back end (SQLite, and PostgreSQL when it is configured)."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from markupsafe import Markup
from sqlalchemy.orm import Session

from conftest import BACKENDS, results_store
from harness.core.errors import UsageError
from harness.report import ExtraSection, write_reports
from harness.report.frame import aggregate_seeds, baseline_defenses, cells_frame, done_cells, match_reported
from harness.report.tables import build_tables, latex_escape, safe_stem, to_markdown
from harness.results import Cell, Run, open_db

EVIL = "<script>alert(1)</script>"
WHEN = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)

MAEP_ENTRY = {
    "name": "maep", "version": "1", "kind": "purifier", "stochastic": True, "differentiable": True,
    "paper": "Masked Autoencoder Purification", "citation": "Doe & Roe, 2025",
    "reported": [
        {"dataset": "cifar10", "threat": "linf", "eps": "8/255", "attack": "AutoAttack (standard)",
         "clean": 90.5, "robust": 60.25, "source": "MAEP paper, Table 3", "classifier": "",
         "tier": "non-adaptive", "unit": "percent"},
        {"dataset": "cifar10", "threat": "linf", "eps": "8/255", "attack": "PGD-20 x EOT",
         "clean": 88.0, "robust": 45.5, "source": "MAEP paper, Table 4", "classifier": "",
         "tier": "adaptive-eot", "unit": "percent"},
        {"dataset": "cifar100", "threat": "linf", "eps": "8/255", "attack": "AutoAttack",
         "clean": 70.0, "robust": 30.0, "source": "elsewhere", "classifier": "", "tier": "non-adaptive",
         "unit": "percent"},
    ],
}
EVIL_ENTRY = {"name": EVIL, "version": "0", "kind": "classifier", "paper": "<b>Evil</b> & 100% _x_",
              "citation": "Mallory <img src=x onerror=alert(2)>", "reported": []}


def _cell(key: str, run: Run, *, defense: str = "maep", entry: dict = MAEP_ENTRY, protocol: str,
          attack_label: str = "PGD-20", clean: float | None = None, robust: float | None = None,
          seed: int = 0, status: str = "done", threat: str = "linf", eps: float = 8 / 255,
          eps_text: str = "8/255", classifier: str = "wrn-28-10",
          data_source: str = "cifar10 torchvision test split", config: dict | None = None, **kw) -> Cell:
    avg = None if clean is None or robust is None else (clean + robust) / 2
    return Cell(key=key, run=run, defense=defense, defense_version=entry["version"], preset="small",
                classifier=classifier, dataset="cifar10", dataset_fingerprint="f1a2b3c4d5e6f7a8b9c0",
                data_source=data_source, variant="clean", threat=threat, eps=eps, eps_text=eps_text,
                attack=attack_label.split("-")[0].lower(), attack_label=attack_label, protocol=protocol,
                n=100, seed=seed, config={"entry": entry, "attack": {"name": "pgd", "steps": 20}, **(config or {})},
                status=status, n_done=100 if status == "done" else 37, clean_acc=clean,
                robust_acc=robust, avg_acc=avg, seconds=12.5, **kw)


@pytest.fixture(scope="module")
def db(module_db_url):
    """The report's store, on each back end."""
    engine = open_db(module_db_url)
    with Session(engine) as session:
        run = Run(git_commit="abc123def4567890abc123def4567890abcdef12", git_dirty=True,
                  harness_version="0.1.0", packages={"torch": "2.4"}, device="cpu",
                  started_at=dt.datetime(2025, 3, 1, 12, 0))
        session.add_all([
            _cell("k1", run, protocol="non-adaptive", clean=0.9, robust=0.5),
            _cell("k2", run, protocol="adaptive-eot", attack_label="PGD-20xEOT4", clean=0.9, robust=0.4),
            _cell("k3", run, protocol="adaptive-eot", attack_label="PGD-20xEOT4", clean=0.88,
                  robust=0.42, seed=1),
            _cell("k4", run, defense=EVIL, entry=EVIL_ENTRY, protocol="non-adaptive", clean=0.8,
                  robust=0.1234, classifier="wrn_28_10 & co 100%"),
            _cell("k5", run, protocol="adaptive", attack_label="APGD-CE", status="failed",
                  error="Traceback (most recent call last):\n  ...\nRuntimeError: boom"),
            _cell("k6", run, protocol="adaptive", threat="l2", eps=0.5, eps_text="0.5", clean=0.7,
                  robust=0.6, data_source="cifar10 ImageFolder archive cifar10-jpeg.tar.gz",
                  metrics={"psnr": 30.5, "note": "text is ignored"}),
        ])
        session.commit()
    return engine


@pytest.fixture(scope="module")
def out(db, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("out")
    extra = [ExtraSection("Extra figures", html=Markup("<p id='trusted'>prepared</p>"),
                          text="<i>escaped</i>", images=["fig/a.png"], caption="a figure")]
    paths = write_reports(db, out_dir, extra_sections=extra, generated_at=WHEN)
    return out_dir, paths


def test_paths_and_filenames(out):
    out_dir, paths = out
    names = {p.relative_to(out_dir).as_posix() for p in paths}
    assert names == {"tables/cifar10_linf_8-255.md", "tables/cifar10_l2_0.5.md",
                     "tables/cifar10_linf_8-255.tex", "tables/cifar10_l2_0.5.tex", "leaderboard.md",
                     "cells.csv", "index.html"}
    assert all(p.is_file() for p in paths)
    assert safe_stem("cifar10", "linf", "8/255") == "cifar10_linf_8-255"
    assert safe_stem("a b/c", "l2", "../x") == "a-b-c_l2_x"


def _md_rows(md: str) -> list[dict[str, str]]:
    """The rows of the (first) pipe table in ``md``, as dicts keyed by header."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]
    return [dict(zip(split[0], row)) for row in split[2:]]


def test_markdown_values_and_seeds(out):
    md = (out[0] / "tables" / "cifar10_linf_8-255.md").read_text()
    rows = _md_rows(md)
    assert [(r["Defense"], r["Protocol"]) for r in rows] == [
        ("\\<script\\>alert(1)\\</script\\>", "non-adaptive"), ("maep", "non-adaptive"),
        ("maep", "adaptive-eot")]
    eot = rows[2]
    assert (eot["Clean"], eot["Robust"], eot["Avg"]) == ("89.00 ± 1.41", "41.00 ± 1.41", "65.00 ± 0.00")
    assert (eot["Reported robust"], eot["Source"]) == ("45.50", "[2]")  # the number of its own tier
    assert (eot["Attack"], eot["n"], eot["Seeds"]) == ("PGD-20xEOT4", "100", "2")
    non = rows[1]
    assert (non["Clean"], non["Robust"], non["Avg"], non["Seeds"]) == ("90.00", "50.00", "70.00", "1")
    assert (non["Reported clean"], non["Reported robust"], non["Source"]) == ("90.50", "60.25", "[1]")
    assert rows[0]["Robust"] == "12.34" and rows[0]["Reported clean"] == "–"
    assert "Version" not in rows[0]  # one version per defense: no column
    assert "[1] MAEP paper, Table 3" in md and "[2] MAEP paper, Table 4" in md and "Reported clean" in md
    assert "12.34" in md  # the evil defense's robust accuracy 0.1234
    assert "APGD-CE" not in md  # the failed cell is not ranked
    assert "\\<script\\>" in md and EVIL not in md
    assert rows[0]["Classifier"] == "wrn\\_28\\_10 & co 100%"  # classifiers differ: a column
    # the l2 table: JPEG copy labelled, numeric metric as a column
    l2 = (out[0] / "tables" / "cifar10_l2_0.5.md").read_text()
    assert "JPEG copy" in l2 and "psnr" in l2 and "30.500" in l2 and "note" not in l2.split("Protocols")[0]
    assert "Reported" not in l2  # no reported number for l2 0.5


def test_latex_escaping(out):
    tex = (out[0] / "tables" / "cifar10_linf_8-255.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "wrn\\_28\\_10 \\& co 100\\%" in tex
    assert "\\textless{}script\\textgreater{}" in tex and "<script>" not in tex
    assert "89.00 $\\pm$ 1.41" in tex and "12.34" in tex
    assert "\\label{tab:cifar10_linf_8-255}" in tex
    assert latex_escape("a_b&c%d$e#f{g}h~i^j\\k[l]") == (
        "a\\_b\\&c\\%d\\$e\\#f\\{g\\}h\\textasciitilde{}i\\textasciicircum{}j\\textbackslash{}k{[}l{]}")
    assert "{[1]} Reported in the paper" in tex and "\\\\\n{[" not in tex


def test_csv(out):
    frame = pd.read_csv(out[0] / "cells.csv")
    assert len(frame) == 6  # every cell, any status
    assert sorted(frame["status"].value_counts().items()) == [("done", 5), ("failed", 1)]
    for col in ("cell_key", "seed", "dataset_fingerprint", "run_git_commit", "clean_acc", "config",
                "entry_paper", "metric_psnr", "attack_params"):
        assert col in frame.columns
    assert set(frame["cell_key"]) == {f"k{i}" for i in range(1, 7)}
    assert (frame["run_git_commit"] == "abc123def4567890abc123def4567890abcdef12").all()
    assert frame.loc[frame["cell_key"] == "k4", "robust_acc"].item() == pytest.approx(0.1234)


def test_html(out):
    html = (out[0] / "index.html").read_text()
    assert EVIL not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>Evil</b>" not in html and "&lt;b&gt;Evil&lt;/b&gt; &amp; 100% _x_" in html
    assert "<img src=x" not in html
    assert 'class="board sortable"' in html and "addEventListener" in html and "aria-sort" in html
    assert "http://" not in html and "https://" not in html  # no network resources
    assert "2025-03-04 05:06:07 UTC" in html and "harness 0.1.0" in html
    assert "abc123def4-dirty" in html and "f1a2b3c4d5e6" in html and "2025-03-01 12:00 UTC" in html
    assert "89.00" in html and "± 1.41" in html and "12.34" in html and "90.50" in html
    assert "MAEP paper, Table 3" in html and "Masked Autoencoder Purification" in html
    for tier in ("non-adaptive", "adaptive-eot", "bpda", "Adaptive (EOT)", "Adaptive (BPDA)"):
        assert tier in html  # legend explains every tier
    assert "adaptive-exact" not in html  # no protocol of that name exists
    assert "JPEG copy" in html
    assert "1 failed" in html and "APGD-CE" in html and "RuntimeError: boom" in html
    assert "<p id='trusted'>prepared</p>" in html and "&lt;i&gt;escaped&lt;/i&gt;" in html
    assert 'src="fig/a.png"' in html


def test_seed_aggregation_frame(db):
    agg = aggregate_seeds(done_cells(cells_frame(db)))
    assert len(agg) == 4
    eot = agg[agg["protocol"] == "adaptive-eot"].iloc[0]
    assert eot["seeds"] == 2 and eot["seed_list"] == [0, 1]
    assert eot["clean_mean"] == pytest.approx(0.89) and eot["clean_std"] == pytest.approx(0.0141421, 1e-4)
    assert eot["reported"]["source"] == "MAEP paper, Table 4"
    tables = build_tables(agg)
    assert [t.stem for t in tables] == ["cifar10_linf_8-255", "cifar10_l2_0.5"]
    assert "Unfinished" not in to_markdown(tables[1])

    # the installed entry's reported numbers (e.g. a corrected citation) win over the stored ones
    fixed = [dict(eot["reported"], source="MAEP paper, Table 4 (corrected)")]
    again = aggregate_seeds(done_cells(cells_frame(db)), {("maep", "1"): fixed})
    assert again[again["protocol"] == "adaptive-eot"].iloc[0]["reported"]["source"].endswith("(corrected)")


def test_other_options_are_not_averaged_as_seeds(tmp_path):
    engine = open_db(f"sqlite:///{tmp_path}/o.db")
    with Session(engine) as session:
        run = Run(git_commit="c0ffee")
        for key, seed, options in (("a", 0, {}), ("b", 1, {}), ("c", 0, {"steps": 5})):
            cell = _cell(key, run, protocol="adaptive", clean=0.5, robust=0.25, seed=seed)
            cell.config = dict(cell.config, seed=seed, defense={"name": "maep", "options": options})
            session.add(cell)
        session.commit()
    agg = aggregate_seeds(done_cells(cells_frame(engine)))
    assert sorted(agg["seeds"]) == [1, 2]
    rows = _md_rows(to_markdown(build_tables(agg)[0]))
    assert [(r["Options"], r["Seeds"]) for r in rows] == [("", "2"), ('{"options":{"steps":5}}', "1")]


def test_match_reported_eps_forms():
    rep = [{"dataset": "CIFAR10", "threat": "Linf", "eps": "0.0314", "attack": "AA", "clean": 1,
            "robust": 2, "source": "s", "tier": "adaptive"}]
    kw = dict(dataset="cifar10", threat="linf", protocol="adaptive")
    assert match_reported(rep, eps=8 / 255, eps_text="8/255", **kw)
    assert match_reported(rep, eps=4 / 255, eps_text="4/255", **kw) is None
    assert match_reported(None, eps=0.1, eps_text="0.1", **kw) is None


def test_match_reported_by_tier_only():
    rep = [{"dataset": "cifar10", "threat": "linf", "eps": "8/255", "attack": "AutoAttack rand (EOT 20), adaptive",
            "robust": 87.3, "tier": "non-adaptive"},
           {"dataset": "cifar10", "threat": "linf", "eps": "8/255", "attack": "AutoAttack standard, non-adaptive",
            "robust": 70.6, "tier": "adaptive-eot"}]
    kw = dict(dataset="cifar10", threat="linf", eps=8 / 255, eps_text="8/255")
    assert match_reported(rep, protocol="non-adaptive", **kw)["robust"] == 87.3  # the tier, not the text
    assert match_reported(rep, protocol="adaptive-eot", **kw)["robust"] == 70.6
    assert match_reported(rep, protocol="adaptive", **kw) is None
    untiered = [{k: v for k, v in item.items() if k != "tier"} for item in rep]  # stored by harness 0.1
    assert all(match_reported(untiered, protocol=p, **kw) is None for p in ("non-adaptive", "adaptive-eot"))


def test_match_reported_only_beside_cells_of_its_variant_and_never_a_transferred_purifier():
    clean = {"dataset": "cifar10", "threat": "linf", "eps": "8/255", "attack": "AA", "robust": 88.7,
             "tier": "non-adaptive"}  # stored before variants were named: a clean-set number
    colored = {**clean, "robust": 60.1, "variant": "colored"}
    kw = dict(dataset="cifar10", threat="linf", eps=8 / 255, eps_text="8/255", protocol="non-adaptive")
    assert match_reported([clean, colored], **kw)["robust"] == 88.7
    assert match_reported([clean, colored], variant="colored", **kw)["robust"] == 60.1
    assert match_reported([clean], variant="corrupt:contrast:5", **kw) is None
    transferred = {"defense": {"name": "maep", "train_dataset": "cifar10"}}
    assert match_reported([clean], config=transferred, **kw) is None
    assert match_reported([clean], config={"defense": {"name": "maep"}}, **kw)["robust"] == 88.7


def test_empty_db(tmp_path):
    engine = open_db(f"sqlite:///{tmp_path}/empty.db")
    paths = write_reports(engine, tmp_path / "out")
    html = (tmp_path / "out" / "index.html").read_text()
    assert "No results yet" in html
    assert "No results yet" in (tmp_path / "out" / "leaderboard.md").read_text()
    assert pd.read_csv(tmp_path / "out" / "cells.csv").empty
    assert not list((tmp_path / "out").glob("tables/*"))
    assert len(paths) == 3


def test_formats_subset_and_stale_tables(db, tmp_path):
    stale = tmp_path / "tables" / "gone_linf_1-255.md"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    paths = write_reports(db, tmp_path, formats="md")
    assert not stale.exists() and all(p.suffix == ".md" for p in paths)
    assert not (tmp_path / "index.html").exists() and not (tmp_path / "cells.csv").exists()
    with pytest.raises(ValueError, match="unknown report format"):
        write_reports(db, tmp_path, formats=("pdf",))


NONE_ENTRY = {"name": "none", "version": "1", "kind": "undefended", "role": "baseline", "paper": "No defense",
              "citation": "-", "reported": []}
ROBUST_ENTRY = {"name": "robust-net", "version": "1", "kind": "classifier", "role": "defense",
                "paper": "A robust network", "citation": "-", "reported": []}
PURIFIER_ENTRY = dict(MAEP_ENTRY, reported=[], role="defense")


def _note(name: str) -> dict:
    """What the runner stores for a cell of an entry without a purifier that answers non-adaptive too."""
    return {"protocol_note": f"{name} has no purifier: non-adaptive attack the same function as adaptive, "
                             f"so this one cell answers them all"}


@pytest.fixture(scope="module", params=BACKENDS)
def mixed_url(request, tmp_path_factory):
    with results_store(request.param, tmp_path_factory.mktemp("mixed")) as url:
        yield url


@pytest.fixture(scope="module")
def mixed_db(mixed_url):
    """A purifier run under non-adaptive and adaptive, the baseline and a classifier entry (own network)
    each with its one adaptive cell, and a cell of a protocol this harness does not know (each back end)."""
    engine = open_db(mixed_url)
    with Session(engine) as session:
        run = Run(git_commit="c0ffee")
        session.add_all([
            _cell("m1", run, protocol="non-adaptive", entry=PURIFIER_ENTRY, clean=0.9, robust=0.6),
            _cell("m2", run, protocol="adaptive", entry=PURIFIER_ENTRY, clean=0.9, robust=0.3),
            _cell("m3", run, defense="none", entry=NONE_ENTRY, protocol="adaptive", clean=0.95, robust=0.0,
                  config=_note("none")),
            _cell("m4", run, defense="robust-net", entry=ROBUST_ENTRY, protocol="adaptive", clean=0.8,
                  robust=0.45, classifier="robust-net@1a2b3c",
                  config=dict(_note("robust-net"), classifier_provenance={"source": "entry", "entry": "robust-net"})),
            _cell("m5", run, protocol="plugin-proto", entry=PURIFIER_ENTRY, clean=0.9, robust=0.2),
        ])
        session.commit()
    return engine


def test_entries_without_a_purifier(mixed_db, tmp_path):
    write_reports(mixed_db, tmp_path, generated_at=WHEN)
    md = (tmp_path / "tables" / "cifar10_linf_8-255.md").read_text()
    rows = {(r["Defense"], r["Protocol"]): r for r in _md_rows(md)}
    assert set(rows) == {("maep", "non-adaptive"), ("maep", "adaptive"), ("maep", "plugin-proto"),
                         ("none", "adaptive †"), ("robust-net", "adaptive †")}
    assert rows["none", "adaptive †"]["Classifier"] == "wrn-28-10"
    assert rows["robust-net", "adaptive †"]["Classifier"] == "robust-net@1a2b3c (own network)"
    assert "† none has no purifier: non-adaptive attack the same function as adaptive" in md
    assert "`plugin-proto` (plugin-proto): Protocol not described" in md  # shown as-is
    tex = (tmp_path / "tables" / "cifar10_linf_8-255.tex").read_text()
    assert "adaptive \\textdagger{}" in tex and "†" not in tex
    html = (tmp_path / "index.html").read_text()
    assert 'title="none has no purifier: non-adaptive attack' in html
    # the gain table: against the baseline role, the classifier entry's adaptive number fills its
    # non-adaptive column, and no baseline shares its network
    gains = html.split("Robust gain under fixed vs fresh randomness")[1].split("</table>")[0]
    cells = {row[4]: row[7:] for row in (re.findall(r"<td>([^<]*)</td>", tr)
                                         for tr in re.findall(r"<tr>(.*?)</tr>", gains, re.S))}
    # non_adaptive, bpda, fixed, fresh, baseline, gain_fixed, gain_fresh
    assert cells == {"robust-net": ["45.00", "45.00", "45.00", "–", "–", "–", "–"],
                     "maep": ["60.00", "–", "30.00", "–", "0.00", "30.00", "–"]}
    assert "No purifier, same function: robust-net attacked once under adaptive" in html


def test_baselines_from_stored_roles_else_installed(mixed_db):
    cells = cells_frame(mixed_db)
    assert baseline_defenses(cells) == {"none"}
    old = cells.assign(entry_role=None)  # cells of harness 0.1 store no role
    assert baseline_defenses(old) == set()
    installed = {("none", "1"): {"role": "baseline"}, ("maep", "1"): {"role": "defense"},
                 ("robust-net", "2"): {"role": "baseline"}}  # another version: not these cells
    assert baseline_defenses(old, installed) == {"none"}


def test_template_override(db, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "leaderboard.html.j2").write_text(
        '{% extends "base.html.j2" %}{% block content %}<p id="custom">{{ tables[0].rows[0].cells[0].main }}'
        '</p>{% endblock %}')
    write_reports(db, tmp_path / "a", formats="html", templates=mine)
    html = (tmp_path / "a" / "index.html").read_text()
    assert '<p id="custom">&lt;script&gt;' in html and "<style>" in html  # the shipped base, escaping on
    (mine / "leaderboard.html.j2").unlink()
    (mine / "base.html.j2").write_text('<html><body id="restyled">{% block content %}{% endblock %}</body></html>')
    write_reports(db, tmp_path / "b", formats="html", templates=mine)
    html = (tmp_path / "b" / "index.html").read_text()
    assert 'id="restyled"' in html and "<style>" not in html and "MAEP paper, Table 3" in html
    with pytest.raises(UsageError, match="templates folder"):
        write_reports(db, tmp_path / "c", formats="html", templates=tmp_path / "missing")


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium not installed (CI installs it)")
def test_screenshot(out, tmp_path):
    from PIL import Image, ImageStat

    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,900",
           (out[0] / "index.html").resolve().as_uri()]
    subprocess.run(cmd, check=False, timeout=120, capture_output=True)
    keep = os.environ.get("HARNESS_KEEP_SCREENSHOT")
    if keep and shot.exists():
        shutil.copy(shot, keep)
    assert shot.exists() and shot.stat().st_size > 20_000
    with Image.open(shot) as img:
        assert img.size == (1280, 900)
        stddev = ImageStat.Stat(img.convert("L")).stddev[0]
    assert stddev > 10  # not a blank page


def test_a_bad_templates_folder_or_format_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from harness.cli import main

    db = tmp_path / "r.db"
    shutil.copy(Path(__file__).parent / "fixtures" / "results-0.1.0.db", db)
    for args in (["--templates", str(tmp_path / "nowhere")], ["--format", "pdf"]):
        result = CliRunner().invoke(main, ["report", "--db", str(db), "--out", str(tmp_path / "out"), *args])
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert result.output.strip().splitlines()[-1].startswith("Error: ")
        assert not (tmp_path / "out").exists()

"""The leaderboard page in a real browser (Playwright driving Debian's chromium through its executable
path; Playwright's own browser builds are never downloaded): a small store of two purifiers under two
protocols at two radii is run and reported, and the page is checked from ``file://``: sorting, search,
the protocol-tier tabs, no console errors, no request leaving the page, a cell's detail page with its
per-sample CSV, screenshots at desktop and phone widths, and byte-identical output from the same store."""

from __future__ import annotations

import csv
import datetime as dt
import os
import shutil
from pathlib import Path

import pytest
import torch.nn.functional as F

from harness.core.entry import Defense, DefenseEntry, ExtraData, Kind, Metadata, Purifier, Reported, registry_of
from harness.evaluation.runner import RunRequest, run_grid
from harness.report import write_reports
from harness.report.html import vendored_library
from harness.results import open_db

from conftest import write_imagefolder

CHROMIUM = "/usr/bin/chromium"
WHEN = dt.datetime(2025, 6, 7, 8, 9, 10, tzinfo=dt.timezone.utc)
N = 8  # test images per cell
DESKTOP, PHONE = (1280, 800), (390, 844)


class _Blur(Purifier):
    """A box blur of odd width ``k`` (deterministic, differentiable)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x, noise):
        pad = self.k // 2
        return F.avg_pool2d(F.pad(x, (pad, pad, pad, pad), mode="replicate"), self.k, stride=1)


def _entry(name: str, k: int, **metadata) -> DefenseEntry:
    return DefenseEntry(name=name, version="1", kind=Kind.PURIFIER, paper=f"{name} paper", citation="Doe 2024",
                        build=lambda ctx: Defense(ctx.classifier, _Blur(k)), metadata=Metadata(**metadata),
                        reported=(Reported("cifar10", "linf", "8/255", "PGD-1", 95.0, 90.0, f"{name} paper, Table 1",
                                           tier="adaptive"),))


ENTRIES = (
    _entry("blur3", 3, architecture="convnet-tiny + 3x3 blur", parameters=1234, nfe=1, venue="TestConf", year=2024,
           extra_data=ExtraData("synthetic", 1000, "a DDPM")),
    _entry("zblur5", 5, architecture="convnet-tiny + 5x5 blur", nfe=2, venue="OtherConf", year=2023),
)


@pytest.fixture(scope="module")
def browser():
    """A headless chromium (Debian's), shared by the module's tests."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"chromium not installed at {CHROMIUM} (`apt-get install chromium`; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """Eight cells (two purifiers x non-adaptive, adaptive x eps 4/255, 8/255, on the harness-trained
    ``tiny`` classifier of a synthetic 'cifar10') rendered into ``out``, and again into ``again``."""
    from harness.data import import_dataset

    tmp = tmp_path_factory.mktemp("leaderboard")
    with pytest.MonkeyPatch.context() as mp:  # an isolated harness home, as conftest's harness_home
        mp.setenv("HARNESS_HOME", str(tmp / "home"))
        for name in ("HARNESS_DATA", "HARNESS_ARTIFACTS", "HARNESS_DB", "HARNESS_DATA_MIRROR"):
            mp.delenv(name, raising=False)
        import_dataset("cifar10", write_imagefolder(tmp / "imagefolder", per_class=8), progress=False)
        engine = open_db(str(tmp / "r.db"))
        request = RunRequest(defenses=("blur3", "zblur5"), classifier="trained:tiny", n=N, batch_size=N,
                             eps=("4/255", "8/255"), attacks=({"name": "pgd", "steps": 1},),
                             protocols=("non-adaptive", "adaptive"), progress=False)
        outcomes = run_grid(request, engine, registry_of(*ENTRIES))
        assert len(outcomes) == 8 and all(o.status == "done" for o in outcomes)
        write_reports(engine, tmp / "out", formats="html", generated_at=WHEN, studies=[])
        # the same store again, later: only the generated-at stamp may differ
        write_reports(engine, tmp / "again", formats="html", generated_at=WHEN + dt.timedelta(days=1, seconds=1),
                      studies=[])
    return tmp / "out" / "index.html"


def _open(browser, url: str, size: tuple[int, int]):
    """A page of a fresh context at viewport ``size`` that records console errors, page errors and every
    request; requests to anything but ``file://`` are aborted (and recorded)."""
    context = browser.new_context(viewport={"width": size[0], "height": size[1]})
    page = context.new_page()
    page.errors, page.requested = [], []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("request", lambda r: page.requested.append(r.url))

    def block(route):
        page.requested.append(route.request.url)
        route.abort() if not route.request.url.startswith("file://") else route.continue_()

    context.route("**/*", block)
    page.goto(url)
    page.wait_for_load_state("load")
    return page


def _rows(page, table: str) -> list[tuple[str, str]]:
    """(defense, protocol) of the visible rows of a leaderboard section, top to bottom."""
    return [tuple(row) for row in page.eval_on_selector_all(
        f"#{table} table.leader > tbody > tr:not([hidden])",
        "rows => rows.map(r => [r.cells[1].textContent.trim(), r.querySelector('.badge').textContent.trim()])")]


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image, ImageStat

    with Image.open(path) as img:
        assert img.format == "PNG"
        assert ImageStat.Stat(img.convert("L")).stddev[0] > 5  # not a blank page
        return img.size


def _keep(*shots: Path) -> None:
    """Copy the screenshots to the folder ``$HARNESS_KEEP_SCREENSHOT`` names, if set (to look at them)."""
    keep = os.environ.get("HARNESS_KEEP_SCREENSHOT")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, Path(keep) / shot.name)


def test_page_in_a_browser(report, browser, tmp_path):
    page = _open(browser, report.resolve().as_uri(), DESKTOP)
    shot = tmp_path / "desktop.png"
    page.screenshot(path=str(shot))
    assert _png_size(shot) == DESKTOP
    _keep(shot)
    wrap = page.locator("section.leader .table-wrap").first.bounding_box()  # the first table is in the shot
    assert wrap["y"] < DESKTOP[1] and wrap["x"] >= 0 and wrap["x"] + wrap["width"] <= DESKTOP[0]
    assert page.evaluate("document.documentElement.scrollWidth") <= DESKTOP[0]
    sections = page.eval_on_selector_all("section.leader", "s => s.map(x => x.id)")
    assert sections == ["t1-cifar10_linf_4-255", "t2-cifar10_linf_8-255"]
    table = sections[1]
    start = [("blur3", "non-adaptive"), ("blur3", "adaptive"), ("zblur5", "non-adaptive"), ("zblur5", "adaptive")]
    assert _rows(page, table) == start

    # RobustBench's columns and the ones it lacks, with the model card's values
    heads = page.eval_on_selector_all(f"#{table} thead th", "hs => hs.map(h => h.textContent.trim())")
    for title in ("Rank", "Defense", "Architecture", "Extra data", "Venue", "Clean", "Best-known", "Robust (this attack)",
                  "Potentially unreliable", "NFE", "s / image", "Attack passes", "Δ robust"):
        assert any(h.startswith(title) for h in heads), (title, heads)
    first = page.locator(f"#{table} table.leader > tbody > tr").first
    text = first.inner_text()
    assert "convnet-tiny + 3x3 blur" in text and "synthetic (1,000, a DDPM)" in text and "TestConf 2024" in text
    delta = page.locator(f"#{table} tr[data-tiers='adaptive'] td.delta-large")
    assert delta.count() == 2  # measured on an untrained network vs a reported 90 %: far apart, highlighted

    # sorting: by protocol (tier order), then by defense twice (descending)
    protocol_head = page.locator(f"#{table} thead th", has_text="Protocol")
    protocol_head.click()
    by_protocol = _rows(page, table)
    assert by_protocol != start and [p for _, p in by_protocol] == ["non-adaptive"] * 2 + ["adaptive"] * 2
    assert protocol_head.get_attribute("aria-sort") == "ascending"
    defense_head = page.locator(f"#{table} thead th").nth(1)
    defense_head.click()
    defense_head.click()
    assert defense_head.get_attribute("aria-sort") == "descending"
    assert [d for d, _ in _rows(page, table)] == ["zblur5", "zblur5", "blur3", "blur3"]

    # search filters the rows of every table (by name, and by model-card text)
    page.fill("#search", "zblur")
    assert {d for d, _ in _rows(page, table)} == {"zblur5"} and len(_rows(page, table)) == 2
    assert page.locator(f"#{table} .count").inner_text() == "2 of 4 rows"
    page.fill("#search", "testconf non-adaptive")
    assert _rows(page, table) == [("blur3", "non-adaptive")] == _rows(page, sections[0])
    page.fill("#search", "no such defense")
    assert _rows(page, table) == [] and page.locator(f"#{table} .no-rows").is_visible()
    page.fill("#search", "")
    assert len(_rows(page, table)) == 4

    # the tier tabs: every tier named, the empty ones disabled; switching changes the table
    tabs = page.locator(f"#{table} [role=tab]")
    labels = [t.strip() for t in tabs.all_inner_texts()]
    assert labels == ["All tiers (4)", "Non-adaptive (2)", "Adaptive (BPDA) (0)", "Adaptive (exact) (2)",
                      "Adaptive (EOT) (0)", "Worst-of-N (0)"]
    assert page.locator(f"#{table} [role=tab][data-tier=worst-of-n]").is_disabled()
    page.locator(f"#{table} [role=tab][data-tier=adaptive]").click()
    assert {p for _, p in _rows(page, table)} == {"adaptive"} and len(_rows(page, table)) == 2
    assert len(_rows(page, sections[0])) == 4  # tabs are per table
    page.locator(f"#{table} [role=tab][data-tier=non-adaptive]").click()
    assert {p for _, p in _rows(page, table)} == {"non-adaptive"}
    page.fill("#search", "zblur5")
    assert _rows(page, table) == [("zblur5", "non-adaptive")]  # tier and search together
    page.fill("#search", "")
    page.locator(f"#{table} [role=tab][data-tier=all]").click()
    assert len(_rows(page, table)) == 4

    # robust accuracy against eps: one inline SVG per setting (two radii each)
    assert page.locator("#curves svg.curve").count() == 4
    assert page.locator("#curves svg.curve polyline").first.get_attribute("points").count(",") == 3  # eps 0, 4, 8

    assert page.errors == [], page.errors

    # a cell's detail page: provenance, and a CSV link to an existing file with one row per sample
    name, protocol = _rows(page, table)[0]  # (still sorted by defense, descending)
    link = page.locator(f"#{table} a.cell-link").first.get_attribute("href")
    assert link.startswith("cells/") and (report.parent / link).is_file()
    detail = _open(browser, (report.parent / link).resolve().as_uri(), DESKTOP)
    body = detail.locator("main").inner_text()
    for fact in ("git commit", "working tree", "harness version", "host", "device", "Packages", "cell key",
                 "Stored config", f"{name} · cifar10 · linf ε = 8/255 · {protocol}"):
        assert fact in body, fact
    href = detail.locator("#samples-csv").get_attribute("href")
    target = (report.parent / link).parent / href
    assert target.is_file() and href.endswith(".csv")
    with target.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N and rows[0].keys() >= {"sample_index", "label", "clean_pred", "adv_pred", "robust_correct"}
    assert [int(r["sample_index"]) for r in rows] == sorted(int(r["sample_index"]) for r in rows)
    assert f"{N} rows" in detail.locator("#samples-csv").inner_text()
    detail.locator("a", has_text="leaderboard").click()
    detail.wait_for_load_state("load")
    assert detail.url == report.resolve().as_uri()
    assert detail.errors == [], detail.errors

    # nothing left the page: every request was for a file:// URL
    requested = page.requested + detail.requested
    assert requested and all(u.startswith("file://") for u in requested), requested


def test_phone_width_screenshot(report, browser, tmp_path):
    page = _open(browser, report.resolve().as_uri(), PHONE)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE[0], f"the page scrolls sideways at phone width: {width} px"
    wrap = page.locator("section.leader .table-wrap").first
    wrap.scroll_into_view_if_needed()
    box = wrap.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE[0] + 0.5  # wide tables scroll inside
    assert page.locator("section.leader table.leader").first.is_visible()
    assert page.locator("#search").bounding_box()["width"] <= PHONE[0]
    shot = tmp_path / "phone.png"
    page.screenshot(path=str(shot))
    assert _png_size(shot) == PHONE
    full = tmp_path / "phone-full.png"
    page.screenshot(path=str(full), full_page=True)
    w, h = _png_size(full)
    assert w == PHONE[0] and h > PHONE[1]
    _keep(shot, full)
    assert page.errors == [], page.errors


def test_same_store_same_bytes(report):
    out, again = report.parent, report.parent.parent / "again"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file())
    assert len([f for f in files if f.startswith("cells/")]) == 16  # a page and a CSV per cell
    for name in files:
        first, second = (out / name).read_bytes(), (again / name).read_bytes()
        if name == "index.html":
            stamp = [b"2025-06-07 08:09:10 UTC", b"2025-06-08 08:09:11 UTC"]
            assert first.count(stamp[0]) == second.count(stamp[1]) > 0
            first, second = first.replace(stamp[0], b"STAMP"), second.replace(stamp[1], b"STAMP")
        assert first == second, name


def test_vendored_library_is_inlined_with_its_licence(report):
    name, version, licence = vendored_library()
    assert (name, licence) == ("tablesort", "MIT") and version.count(".") == 2
    html = report.read_text()
    assert f"{name} {version}" in html and "Copyright (c) Tristen Brown" in html and "Tablesort" in html
    assert "http://" not in html and "https://" not in html and "<script src" not in html
    assert "<link" not in html
    licence = Path(__file__).resolve().parents[1] / "templates" / "tablesort.LICENCE"
    assert "Permission is hereby granted" in licence.read_text() and "Tristen Brown" in licence.read_text()


def test_worst_of_n_tab_and_column_and_stale_pages(tmp_path):
    """Adaptive-EOT cells whose samples carry worst-of-N draws get a Worst-of-N column and tab; a
    detail page of a cell no longer in the store is removed (no browser needed)."""
    import re

    from sqlalchemy.orm import Session

    from harness.results import Cell, Run, SampleResult

    engine = open_db(f"sqlite:///{tmp_path}/w.db")
    entry = {"name": "noisy", "version": "1", "kind": "purifier", "role": "defense", "stochastic": True,
             "metadata": {"architecture": "wrn", "nfe": 30, "extra_data": None, "venue": "", "year": None}}
    with Session(engine) as session:
        run = Run(git_commit="c0ffee", git_dirty=False, packages={"torch": "2.4"}, host="box", device="cpu")
        for key, protocol, draws in (("eot", "adaptive-eot", [10, 10, 3, 0]), ("fixed", "adaptive", None)):
            cell = Cell(key=key, run=run, defense="noisy", defense_version="1", preset="small", classifier="c",
                        dataset="cifar10", dataset_fingerprint="f", data_source="s", variant="clean", threat="linf",
                        eps=8 / 255, eps_text="8/255", attack="pgd", attack_label="PGD-20", protocol=protocol,
                        n=4, seed=0, status="done", n_done=4, clean_acc=1.0, robust_acc=0.75, avg_acc=0.875,
                        seconds=2.0, config={"entry": entry, "attack": {"name": "pgd", "steps": 20, "eot": 4}})
            cell.samples = [SampleResult(sample_index=i, label=1, clean_pred=1, adv_pred=1 if i < 3 else 0,
                                         perturbation=0.01,
                                         extra={"worst_of": 10, "adv_correct_draws": d} if draws else None)
                            for i, d in enumerate(draws or [0] * 4)]
            session.add(cell)
        session.commit()
    stale = tmp_path / "out" / "cells" / "gone.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    write_reports(engine, tmp_path / "out", formats="html", generated_at=WHEN, studies=[])
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "out" / "cells").iterdir()) == ["eot.csv", "eot.html", "fixed.csv",
                                                                             "fixed.html"]
    html = (tmp_path / "out" / "index.html").read_text()
    assert re.search(r'data-tier="worst-of-n"[^>]*>Worst-of-N <span class="n">\(1\)', html)
    assert 'data-tiers="adaptive-eot worst-of-n"' in html and 'data-tiers="adaptive"' in html
    assert ">50.00</td>" in html  # worst-of-N: 2 of 4 samples correct on all 10 re-draws
    assert "≈80" in html  # PGD-20 x EOT 4: estimated attack passes per attacked point
    assert 'href="#sec-robust-gain-under-fixed-vs-fresh-randomness"' in html  # the gap, linked from the table
    with (tmp_path / "out" / "cells" / "eot.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["sample_index"], r["robust_correct"], r["adv_correct_draws"]) for r in rows] == [
        ("0", "1", "10"), ("1", "1", "10"), ("2", "1", "3"), ("3", "0", "0")]

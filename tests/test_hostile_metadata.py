"""Hostile metadata renders inert: an entry whose paper, citation, description, model card, reported
numbers and option values carry HTML and JavaScript (and a classifier file named like a tag) is run and
reported; headless Chromium loads the leaderboard and no script of theirs runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.core.entry import Defense, DefenseEntry, Kind, Metadata, Option, Reported, registry_of
from harness.evaluation.runner import RunRequest, run_grid
from harness.report import write_reports
from harness.results import open_db

CHROMIUM = "/usr/bin/chromium"


def _mark(where: str) -> str:
    """JavaScript that, if it ever runs, leaves ``data-pwned="<where>"`` on the page (no slash in it, so
    it fits a file name)."""
    return f"document.documentElement.setAttribute('data-pwned','{where}')"


PAYLOADS = {
    "paper": f"<script>{_mark('paper')}</script>",
    "citation": f"<img src=x onerror=\"{_mark('citation')}\">",
    "description": f"\"><svg onload={_mark('description')}>",
    "architecture": f"</td><script>{_mark('architecture')}</script>",
    "venue": "{{ 7 * 7 }}",
    "attack": f"<img src=x onerror={_mark('attack')}>",
    "source": f"</li><img src=x onerror={_mark('source')}>",
    "reported_classifier": f"\" onmouseover=\"{_mark('reported_classifier')}",
    "option_help": f"<script>{_mark('option_help')}</script>",
    "option_value": f"' autofocus onfocus='{_mark('option_value')}' x='",
}
CODE_URL = f"javascript:{_mark('code_url')}"
FILE_NAME = f"<img src=x onerror={_mark('file')}>.safetensors"


def _entry() -> DefenseEntry:
    return DefenseEntry(
        name="hostile", version="1", kind=Kind.UNDEFENDED, paper=PAYLOADS["paper"], citation=PAYLOADS["citation"],
        description=PAYLOADS["description"], build=lambda ctx: Defense(ctx.classifier),
        metadata=Metadata(architecture=PAYLOADS["architecture"], venue=PAYLOADS["venue"], code_url=CODE_URL),
        options=(Option("note", str, PAYLOADS["option_help"], default=""),),
        reported=(Reported("cifar10", "linf", "8/255", PAYLOADS["attack"], 50.0, 10.0, PAYLOADS["source"],
                           PAYLOADS["reported_classifier"], tier="adaptive"),))


class _Elements(HTMLParser):
    """The elements of a page: (tag, attribute names), in order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, [name for name, _ in attrs]))


def _dump_dom(page: Path, profile: Path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
           "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}",
           "--dump-dom", page.resolve().as_uri()]
    return subprocess.run(cmd, check=True, timeout=120, capture_output=True, text=True).stdout


@pytest.fixture()
def report(tiny_cifar, classifier_file, tmp_path) -> Path:
    hostile_file = tmp_path / FILE_NAME
    shutil.copy(classifier_file, hostile_file)
    engine = open_db(str(tmp_path / "r.db"))
    request = RunRequest(defenses=("hostile",), classifier=str(hostile_file), n=4, batch_size=4,
                         attacks=({"name": "pgd", "steps": 1},), protocols=("adaptive",),
                         options={"note": PAYLOADS["option_value"]}, progress=False)
    [outcome] = run_grid(request, engine, registry_of(_entry()))
    assert outcome.status == "done"
    write_reports(engine, tmp_path / "out", formats="html")
    return tmp_path / "out" / "index.html"


def _hrefs(page: Path) -> list[str]:
    return re.findall(r"""href\s*=\s*["']?([^"'\s>]*)""", page.read_text(), flags=re.IGNORECASE)


def test_code_url_is_never_a_link(report):
    hrefs = _hrefs(report)
    # in-page anchors, web links, and the report's own cell detail pages (cells/<key>.html)
    assert hrefs and all(h.startswith("#") or re.match(r"https?://", h)
                         or re.fullmatch(r"cells/[A-Za-z0-9.+_-]+\.html", h) for h in hrefs), hrefs
    [page] = report.parent.glob("cells/*.html")  # the one cell's detail page links only home and to its CSV
    assert sorted(_hrefs(page)) == ["../index.html", page.with_suffix(".csv").name]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium not installed (CI installs it)")
def test_no_script_of_the_metadata_runs_in_a_browser(report, tmp_path):
    control = tmp_path / "control.html"  # the same payloads unescaped: they do run, so the check can see them
    control.write_text("<!doctype html><html><head><title>t</title></head><body><table><tr><td>"
                       + "".join(PAYLOADS.values()) + f"<img src=x onerror={_mark('file')}></td></tr></table>"
                       + "</body></html>")
    assert 'data-pwned="' in _dump_dom(control, tmp_path / "profile-control")

    dom = _dump_dom(report, tmp_path / "profile")
    assert "<table" in dom and "hostile" in dom  # the page rendered, with the entry
    assert 'data-pwned="' not in dom
    for text in ("&lt;script&gt;" + _mark("paper"), "&lt;img src=x onerror=", "&lt;/li&gt;&lt;img src=x"):
        assert text in dom  # shown as text
    elements = _Elements()
    elements.feed(dom)
    assert not [a for _, attrs in elements.tags for a in attrs if a.startswith("on") or a == "data-pwned"]
    assert [t for t, _ in elements.tags if t in ("script", "img", "svg", "iframe")] == ["script"]  # the page's own

    [page] = report.parent.glob("cells/*.html")  # the cell's detail page shows the same metadata, inert too
    dom = _dump_dom(page, tmp_path / "profile-cell")
    assert "hostile" in dom and 'data-pwned="' not in dom and "&lt;script&gt;" + _mark("paper") in dom
    elements = _Elements()
    elements.feed(dom)
    assert not [a for _, attrs in elements.tags for a in attrs if a.startswith("on") or a == "data-pwned"]
    assert [t for t, _ in elements.tags if t in ("script", "img", "svg", "iframe")] == ["script"]

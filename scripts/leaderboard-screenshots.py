"""Screenshots of the published leaderboard (leaderboards/index.html) in Debian's chromium, driven by
Playwright: the top of the page at desktop width and the first table at phone width, written to
leaderboards/screenshots/ (which CI's regeneration check leaves out: they are pictures of the page, not
rendered by `harness report`).

    python scripts/leaderboard-screenshots.py [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

LEADERBOARDS = Path(__file__).resolve().parents[1] / "leaderboards"
VIEWS = {"desktop.png": {"width": 1400, "height": 1000}, "phone.png": {"width": 390, "height": 844}}
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    page_url = (LEADERBOARDS / "index.html").as_uri()
    out = LEADERBOARDS / "screenshots"
    out.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=FLAGS)
        for name, viewport in VIEWS.items():
            page = browser.new_page(viewport=viewport)
            page.goto(page_url)
            page.screenshot(path=str(out / name))
            print(out / name)
            page.close()
        browser.close()


if __name__ == "__main__":
    main()

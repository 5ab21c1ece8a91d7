"""The README's leaderboard block: the top rows of the main table, rendered from the results store between
two marker comments, so the repository's front page shows measured numbers and never hand-typed ones.

``harness report --readme README.md`` rewrites the block; CI renders it again from the committed
``results.db`` and fails when the README's copy differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness.core.errors import UsageError
from harness.report.tables import LeaderTable, markdown_escape, markdown_rows

__all__ = ["START", "END", "main_table", "readme_block", "check_readme", "update_readme"]

START = "<!-- leaderboard:start (harness report --readme README.md writes this block; do not edit) -->"
END = "<!-- leaderboard:end -->"

#: the columns the README shows (the page and leaderboard.md have all of them)
README_COLUMNS = ("defense", "protocol", "attack", "clean", "best", "robust", "n", "flags")


def main_table(tables: Sequence[LeaderTable]) -> LeaderTable | None:
    """The headline table: CIFAR-10 (else the first dataset), l-inf, clean test data, the first eps."""
    clean = [t for t in tables if not t.variants]
    return next((t for t in clean if t.dataset == "cifar10" and t.threat == "linf"), clean[0] if clean else None)


def readme_block(tables: Sequence[LeaderTable], stamp: str, link: str, rows: int = 8) -> str:
    """The block (markers included): a link to the page and the top ``rows`` rows of :func:`main_table`."""
    table = main_table(tables)
    lines = [START, ""]
    if table is None:
        lines.append(f"**[Leaderboard]({link})**: no results yet.")
    else:
        shown = min(rows, len(table.rows))
        lines += [f"**[Leaderboard]({link})** · {table.title} · top {shown} of {len(table.rows)} rows · results as "
                  f"of {stamp} (rendered from `results.db` by `harness report`; accuracies in percent, "
                  "Best-known = the per-sample worst case over every stored attack)", "",
                  markdown_rows(table, rows, README_COLUMNS)]
        if table.notes:
            lines += ["", " · ".join(markdown_escape(note) for note in table.notes)]
    return "\n".join(lines + ["", END])


def check_readme(path: Path) -> tuple[str, str]:
    """The text of ``path`` before and after its block; a one-line error if it cannot be read or has none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise UsageError(f"{path} has no leaderboard block: put the lines {START!r} and {END!r} where it "
                         "belongs")
    return text[:start], text[end + len(END):]


def update_readme(path: Path, block: str) -> Path:
    """Replace the block of ``path`` (between :data:`START` and :data:`END`) with ``block``."""
    before, after = check_readme(path)
    Path(path).write_text(before + block + after, encoding="utf-8")
    return Path(path)

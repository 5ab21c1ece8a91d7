"""Where a number came from: the code's commit, the package versions, the machine."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version

import torch

from harness import __version__

TRACKED_PACKAGES = ("torch", "pyautoattack", "diffusers", "kornia", "torchmetrics", "numpy",
                    "sqlalchemy", "alembic", "psycopg", "pandas", "robustbench")


def _git(*args: str) -> str:
    """``git ARGS`` in the folder harness is imported from (a checkout, or nothing for an installed wheel)."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _published(path: str) -> bool:
    """Whether a path of the checkout is the published leaderboard's data (results.db, and what
    ``harness report`` renders into leaderboards/), which a study run changes without changing the code;
    the study files in leaderboards/studies/ are inputs, so they count."""
    return path == "results.db" or (path.startswith("leaderboards/") and not path.startswith("leaderboards/studies/"))


def code_dirty(changed: str) -> bool:
    """Whether ``git diff --name-only HEAD`` (the tracked files changed since the commit, one path from the
    top of the checkout per line) names a file other than the published data."""
    return any(not _published(path.strip('"')) for path in changed.splitlines() if path.strip())


@lru_cache(maxsize=1)
def code_provenance() -> dict[str, object]:
    """Git commit and dirtiness of the checkout's code (:func:`code_dirty`), harness and package versions,
    device, host."""
    packages = {}
    for name in TRACKED_PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            continue
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": code_dirty(_git("diff", "--name-only", "HEAD")),
        "harness_version": __version__,
        "packages": packages,
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "host": platform.node(),
    }

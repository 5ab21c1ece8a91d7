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


@lru_cache(maxsize=1)
def code_provenance() -> dict[str, object]:
    """Git commit and dirtiness of the checkout, harness and package versions, device, host."""
    packages = {}
    for name in TRACKED_PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            continue
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "harness_version": __version__,
        "packages": packages,
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "host": platform.node(),
    }

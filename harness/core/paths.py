"""Where harness keeps its files: everything under one home, each part overridable."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir


def harness_home() -> Path:
    """``$HARNESS_HOME``, else the user cache dir (e.g. ``~/.cache/harness``)."""
    return Path(os.environ.get("HARNESS_HOME") or user_cache_dir("harness")).expanduser()


def data_root(override: str | os.PathLike | None = None) -> Path:
    """Datasets: ``--data-root``, else ``$HARNESS_DATA``, else ``<home>/data``."""
    return Path(override or os.environ.get("HARNESS_DATA") or harness_home() / "data").expanduser()


def artifact_root(override: str | os.PathLike | None = None) -> Path:
    """Trained weights: ``$HARNESS_ARTIFACTS``, else ``<home>/artifacts``."""
    return Path(override or os.environ.get("HARNESS_ARTIFACTS") or harness_home() / "artifacts").expanduser()

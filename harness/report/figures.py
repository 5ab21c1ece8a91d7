"""The report's figures: matplotlib on the non-interactive Agg backend, written as PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["plt", "save_figure"]


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` (parents created) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, metadata={"Software": None})  # no version stamp: the same data, the same bytes
    plt.close(fig)
    return path

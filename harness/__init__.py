"""harness: a benchmark harness and leaderboard for adversarial defenses of image classifiers.

``harness.evaluate(...)`` is :func:`harness.api.evaluate`; everything a plugin author needs is in
:mod:`harness.api`.
"""

from typing import Any

__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name == "evaluate":  # imported on first use, so `import harness` stays light
        from harness.api import evaluate

        return evaluate
    raise AttributeError(f"module 'harness' has no attribute {name!r}")

"""Model architectures (image classifiers)."""

from harness.models.classifiers import ARCHITECTURES, build_classifier

__all__ = ["ARCHITECTURES", "build_classifier"]

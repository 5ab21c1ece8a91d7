"""harness: a benchmark harness and leaderboard for adversarial defenses of image classifiers."""

__version__ = "0.1.0"

"""A plugin whose module fails on import."""

raise RuntimeError("broken on purpose")

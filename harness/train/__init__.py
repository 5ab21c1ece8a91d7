"""Training recipes (classifiers, purifiers)."""

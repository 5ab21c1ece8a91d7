"""First-party defense entries, registered through the same ``harness.defenses`` entry-point group as
third-party plugins (see pyproject.toml)."""

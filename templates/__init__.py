"""The leaderboard's Jinja2 templates, installed as the package ``harness.templates`` (mapped from
the repository's top-level ``templates/`` folder in ``pyproject.toml``); read with
:func:`harness.report.html.environment`."""

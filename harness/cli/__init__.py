"""The ``harness`` command line, the top layer: a thin shell over :mod:`harness.api`, the reports and the
registries. ``app`` holds the command group; ``options`` the option definitions every command shares; one
module per command family (``run``, ``report``, ``listing``, ``train``, ``data``, ``analyse``, ``db``)."""

from harness.cli.app import main

__all__ = ["main"]

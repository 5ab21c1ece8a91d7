"""Errors whose message is meant for the user (the CLI prints them without a traceback)."""


class UsageError(ValueError):
    """Bad input from the user: the message says what was wrong and lists the valid choices."""


class MissingArtifactError(UsageError):
    """A trained artifact (weights, data) is needed but absent and may not be produced now."""

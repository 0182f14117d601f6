"""The one error type a user sees as a clean one-line message (no traceback)."""


class DiffuseError(Exception):
    """Bad input or a run that cannot go on; the CLI prints it on one line and exits with 1."""

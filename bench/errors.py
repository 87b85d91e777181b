"""The one exception type for errors a user can cause and fix; the CLI prints it without a traceback."""


class BenchError(Exception):
    """A user-facing error whose message says how to fix it."""

"""User-facing errors: one sentence naming the problem and the fix; the CLI exits 2."""


class VitdiagError(Exception):
    """Bad input from the user. The message is shown as is, without a traceback."""

    exit_code = 2


class CheckFailed(Exception):
    """A threshold check failed; the CLI exits 1."""

    exit_code = 1

"""Errors a user can fix. The CLI prints them as one line and exits with code 2, without a traceback."""


class UserError(Exception):
    """Bad input: say what was wrong, where, and what to do about it."""

    exit_code = 2

"""Errors that the command line reports as one line, exit code 2."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""

"""The errors a user can fix: a bad config value, data file, model folder or run directory.

Each message names the file, record, field or key and says what is wrong with it. The command
line prints these as one line; any other exception is a bug in evostar and says so (its
traceback is shown with `--debug` or `EVOSTAR_DEBUG=1`).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (config, data, model files, run directory), described in words."""


class RunDirError(UserError):
    """A run directory that cannot be created, continued or read."""

"""The one exception type meant for users.

Anything raised as `UserError` is printed by the CLI as a single line and exits with code 2
(`SaveError`, the machine refusing a write, with code 1); every other exception is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user (a config, a path, a flag); the message says how to fix it."""


class SaveError(UserError):
    """A write the machine refused (a full disk, a read-only or vanished folder, no
    permission): not the user's input, so the CLI exits with 1, but one line all the same,
    naming the file. Nothing half-written is left: every save is atomic."""

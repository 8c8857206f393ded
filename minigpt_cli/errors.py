"""The one exception type meant for users.

Anything raised as `UserError` is printed by the CLI as a single line and exits with code 2;
every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user (a config, a path, a flag); the message says how to fix it."""

"""Exception types for mistakes a user can make.

cli.py catches ``UserError`` and prints it as one line on stderr with exit code 2; anything else that
escapes is a bug in mbv2train and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint), reported without a traceback."""


class ConfigError(UserError):
    """A config file or override is unreadable, malformed, or names a bad key or value."""

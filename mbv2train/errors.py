"""Exception types for mistakes a user can make.

cli.py catches ``UserError`` and prints it as one line on stderr with exit code 2; anything else that
escapes is a bug in mbv2train and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint), reported without a traceback."""

    exit_code = 2

    def __init__(self, message: str = ""):
        # A DataLoader worker's error reaches the main process re-raised as
        # ErrorType("Caught ErrorType in DataLoader worker process N.\nOriginal Traceback ...\nmodule.ErrorType: msg");
        # the user needs the last line's message, not the worker's traceback.
        if "\nOriginal Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class ConfigError(UserError):
    """A config file or override is unreadable, malformed, or names a bad key or value."""


class DataError(UserError):
    """A dataset folder is missing, empty, laid out wrongly, or disagrees with the model or checkpoint."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or does not fit the run it is loaded into."""


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite (train.nonfinite: raise), or stayed so too long (skip)."""


class CheckFailed(UserError):
    """The input was fine but the work failed a check (an export that disagrees with PyTorch, a process of
    the run that died or hung): one line, exit 1."""

    exit_code = 1

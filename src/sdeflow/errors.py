"""The errors sdeflow raises for a user's mistake, under one base class, so the command line can tell them from
bugs: each message names the key, file or flag at fault and what to do."""

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "RunFolderError",
    "SdeflowError",
    "TrainingDivergedError",
]


class SdeflowError(Exception):
    """Base class of every error that is the user's to fix; the command line prints its message, not a traceback."""

    exit_code = 2


class ConfigError(SdeflowError, ValueError):
    """A configuration problem; the message names the offending key or file."""


class DataError(SdeflowError, ValueError):
    """A dataset that cannot be read as asked; the message names the file."""


class DataNotFoundError(SdeflowError, FileNotFoundError):
    """A dataset file or folder that does not exist; the message names it."""


class CheckpointError(SdeflowError, RuntimeError):
    """A missing, incomplete, corrupted or unusable checkpoint; the message names the file."""


class RunFolderError(SdeflowError):
    """A run folder that already holds another run, or a resume whose settings differ from the run's."""


class UsageError(SdeflowError):
    """Command-line arguments that do not fit each other, the model or the machine; the message names the flags."""


class TrainingDivergedError(SdeflowError, RuntimeError):
    """The loss became NaN, infinite or exploded; the message names the last checkpoint with finite weights."""

    exit_code = 1

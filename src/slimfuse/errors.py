"""User-facing errors.

Every error a user can cause derives from :class:`SlimfuseError`. The CLI turns
these into one line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""


class SlimfuseError(Exception):
    """Base class for errors caused by user input."""


class DataError(SlimfuseError, ValueError):
    """A data set or data file is unusable (NaN, bad labels, missing columns ...)."""


class ArtifactError(SlimfuseError, ValueError):
    """An artifact folder or model file is missing, corrupt, foreign or too new."""


class ConfigError(SlimfuseError, ValueError):
    """A parameter, scheme name or recipe field is invalid."""

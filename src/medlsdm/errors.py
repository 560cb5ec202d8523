"""Errors a user can cause. The command line prints them as one line, without a traceback."""


class MedlsdmError(Exception):
    """A problem with the user's input or environment (bad file, bad option, missing weights).

    The message should name the file or option and say what is wrong, in one line.
    """


class DataError(MedlsdmError):
    """An input volume or label map that cannot be used as it is."""


class ConfigError(MedlsdmError):
    """An unknown preset, key or value in a configuration."""

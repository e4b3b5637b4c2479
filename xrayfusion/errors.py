"""Errors that entry points turn into a short message and a non-zero exit, never a traceback."""


class XrayfusionError(Exception):
    """Base class: the message names the bad value and the fix."""


class ConfigError(XrayfusionError):
    """A configuration value is invalid."""


class DataError(XrayfusionError):
    """Input data is missing, malformed or has an unexpected layout."""

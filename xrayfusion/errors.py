"""Errors that entry points turn into a short message and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn


class XrayfusionError(Exception):
    """Base class: the message names the bad value and the fix."""


class ConfigError(XrayfusionError):
    """A configuration value is invalid."""


class DataError(XrayfusionError):
    """Input data is missing, malformed or has an unexpected layout."""


def fail(message: str) -> NoReturn:
    """Print `xrayfusion: error: <message>` to stderr and exit with status 2 (no traceback)."""
    print(f"xrayfusion: error: {message}", file=sys.stderr)
    sys.exit(2)


@contextmanager
def exit_on_error() -> Iterator[None]:
    """Entry points run their body inside this: an XrayfusionError becomes `fail(message)`."""
    try:
        yield
    except XrayfusionError as err:
        fail(str(err))

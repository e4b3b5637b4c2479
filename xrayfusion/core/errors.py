"""Errors that entry points turn into a short message and a non-zero exit, never a traceback."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable
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


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean x?)' naming the closest candidate to a mistyped `name`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""

"""What could not be used: a printed summary, a CSV for MLflow, and the strict-mode error."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from xrayfusion.core.errors import DataError
from xrayfusion.data.decode import Failure


def skipped_summary(skipped: Sequence[Failure], first: int = 5) -> str:
    """'N file(s) skipped: name (reason); ...' naming the first few."""
    shown = "; ".join(f"{Path(f.path).name} ({f.reason})" for f in skipped[:first])
    more = f"; ... and {len(skipped) - first} more" if len(skipped) > first else ""
    return f"{len(skipped)} file(s) skipped: {shown}{more}"


def write_skipped_csv(skipped: Sequence[Failure], path: str | Path) -> Path:
    """One row per skipped file: path, reason."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "reason"])
        writer.writerows((f.path, f.reason) for f in skipped)
    return path


def check_strict(skipped: Sequence[Failure], strict: bool) -> None:
    """With data.strict=true any skipped file is an error, raised before training."""
    if strict and skipped:
        raise DataError(
            f"data.strict=true and {skipped_summary(skipped, first=20)}. Fix or remove these files, or set "
            "data.strict=false to skip them"
        )

"""A dataset report printed before anyone trains: splits, classes, patients, image sizes, skipped files, leaks."""

from __future__ import annotations

from xrayfusion.data.imageset import SourceData
from xrayfusion.data.skipped import skipped_summary

SPLITS = ("train", "val", "test")


def _size_range(sizes: list[tuple[int, int]] | None) -> str:
    if not sizes:
        return "-"
    small = min(sizes, key=lambda s: (s[0] * s[1], s))
    large = max(sizes, key=lambda s: (s[0] * s[1], s))
    return f"{small[0]}x{small[1]}" if small == large else f"{small[0]}x{small[1]} .. {large[0]}x{large[1]}"


def shared_patients(source: SourceData) -> dict[str, list[str]]:
    """Patients found in more than one split, per pair of splits ('train+test': [...])."""
    groups = {s: set(getattr(source, s).groups) for s in SPLITS if getattr(source, s) is not None}
    names = list(groups)
    shared = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = sorted(groups[a] & groups[b])
            if both:
                shared[f"{a}+{b}"] = both
    return shared


def dataset_report(source: SourceData) -> str:
    """Split and class counts, patients per split, original image size range, skipped files, patient leaks."""
    classes = source.class_names
    header = ["split", "images", *classes, "patients", "image sizes"]
    rows = []
    for name in SPLITS:
        split = getattr(source, name)
        if split is None:
            continue
        counts = split.class_counts(len(classes))
        rows.append([name, str(len(split)), *map(str, counts), str(len(set(split.groups))), _size_range(split.sizes)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["classes (label order): " + ", ".join(f"{i}={c}" for i, c in enumerate(classes))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.append(f"skipped: {skipped_summary(source.skipped) if source.skipped else 'none'}")
    shared = shared_patients(source)
    if shared:
        detail = "; ".join(f"{pair}: {len(ids)} ({', '.join(ids[:5])})" for pair, ids in shared.items())
        lines.append(f"patients in two splits: {detail}")
    else:
        lines.append("patients in two splits: none")
    return "\n".join(lines)

"""Data: sources behind a registry, patient splits, decode + cache, transforms, the DataModule; imports core only."""

from xrayfusion.data import coronahack, sources  # noqa: F401  (register the built-in sources)
from xrayfusion.data.datamodule import XRayDataModule
from xrayfusion.data.imageset import ImageSet, SourceData
from xrayfusion.data.registry import build_source, register_source, source_names

__all__ = ["ImageSet", "SourceData", "XRayDataModule", "build_source", "register_source", "source_names"]

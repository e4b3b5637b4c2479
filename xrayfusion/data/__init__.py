"""Data sources, patient-level splits, tensor transforms and the LightningDataModule."""

from xrayfusion.data.datamodule import XRayDataModule
from xrayfusion.data.sources import ImageSet, build_source

__all__ = ["ImageSet", "XRayDataModule", "build_source"]

"""Fusion: strategies behind a registry, meta-learners, calibration, thresholds, cross-fitting; imports data, core."""

from xrayfusion.fusion.strategies import FUSIONS, Fusion, build_fusion, check_fusion, register_fusion

__all__ = ["FUSIONS", "Fusion", "build_fusion", "check_fusion", "register_fusion"]

"""Backbones (timm factory + the project's own CNNs), fusion strategies and the LightningModule."""

from xrayfusion.models import cnns  # noqa: F401  (registers small_cnn and darknet with timm)
from xrayfusion.models.backbones import create_backbone, known_backbones
from xrayfusion.models.fusion import FUSIONS, build_fusion
from xrayfusion.models.module import FusionClassifier

__all__ = ["FUSIONS", "FusionClassifier", "build_fusion", "create_backbone", "known_backbones"]

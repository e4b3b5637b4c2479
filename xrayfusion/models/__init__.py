"""Models: backbones (timm + project CNNs), pretrained weights, precision, the LightningModule; imports fusion, core."""

from xrayfusion.models import cnns  # noqa: F401  (registers small_cnn and darknet with timm)
from xrayfusion.models.backbones import create_backbone, known_backbones
from xrayfusion.models.module import FusionClassifier

__all__ = ["FusionClassifier", "create_backbone", "known_backbones"]

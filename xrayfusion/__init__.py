"""xrayfusion: config-driven ensembles of CNN backbones for chest X-ray classification."""

from xrayfusion.core.errors import ConfigError, DataError, XrayfusionError

__all__ = ["ConfigError", "DataError", "XrayfusionError"]
__version__ = "0.1.0"

"""Checks of the fusion config that must fail before any data is read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xrayfusion.core.errors import ConfigError
from xrayfusion.fusion import thresholds
from xrayfusion.fusion.crossfit import AUTO, auto_settings, parse_cv
from xrayfusion.fusion.meta import check_hgb_export, check_meta
from xrayfusion.fusion.strategies import check_fusion


def validate_fusion(cfg: Mapping[str, Any], n_branches: int) -> None:
    """fusion.name / cv / meta / calibrate and metrics.threshold: ConfigError naming the bad value and the fix."""
    fusion = cfg["fusion"]
    check_fusion(fusion.get("name"), n_branches)
    cv = parse_cv(fusion.get("cv", "holdout"))
    if fusion.get("name") == "stacking":
        if check_meta(str(fusion.get("meta", "logreg"))) == "hgb":
            check_hgb_export()  # before any training, not after it
    learned = fusion.get("name") == "average" and fusion.get("weights") == "learned"
    fitted = fusion.get("name") == "stacking" or learned
    if cv is not None and not fitted:
        raise ConfigError(
            f"fusion.cv={fusion.get('cv')} only applies to fitted fusions; use fusion=stacking or "
            "fusion=average fusion.weights=learned, or drop fusion.cv"
        )
    if fitted:  # fusion.cv=auto decides with it; a fit on validation warns with it when validation is saturated
        _, folds = auto_settings(fusion.get("auto_cv"))
    if cv == AUTO:
        if folds == 0 and not learned:
            raise ConfigError(
                "fusion.auto_cv.folds=0 (equal weights when validation is saturated) needs fusion=average "
                "fusion.weights=learned; a stacking meta-learner must be fitted: use fusion.auto_cv.folds=5"
            )
    # chooses between learned and equal weights: nothing to choose (ignored) unless weights are learned
    if not isinstance(fusion.get("prefer_equal", False), bool):
        raise ConfigError(f"fusion.prefer_equal={fusion.get('prefer_equal')!r} must be true or false")
    if not isinstance(fusion.get("calibrate", False), bool):
        raise ConfigError(f"fusion.calibrate={fusion.get('calibrate')!r} must be true or false")
    thresholds.parse_rule(cfg.get("metrics", {}).get("threshold", 0.5))

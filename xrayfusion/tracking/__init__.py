"""MLflow helpers (store, runs, params, artifacts); may import xrayfusion.core only."""

from xrayfusion.tracking.runs import (
    ENV_URI,
    ResumedMLFlowLogger,
    create_logger,
    ensure_experiment,
    flatten,
    is_local,
    log_artifact,
    log_dataset_inputs,
    log_params,
    prepare_store,
    require_store,
    resolve_run_id,
    resolve_tracking_uri,
    set_status,
    set_tags,
    system_metrics,
)

__all__ = [
    "ENV_URI",
    "ResumedMLFlowLogger",
    "create_logger",
    "ensure_experiment",
    "flatten",
    "is_local",
    "log_dataset_inputs",
    "log_artifact",
    "log_params",
    "prepare_store",
    "require_store",
    "resolve_run_id",
    "resolve_tracking_uri",
    "set_status",
    "set_tags",
    "system_metrics",
]

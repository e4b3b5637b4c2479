"""Data sources by name (`data.name`): a new source is a function registered here plus a conf/data/*.yaml."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from xrayfusion.core.errors import ConfigError, did_you_mean
from xrayfusion.data.imageset import SourceData

SourceBuilder = Callable[[Mapping[str, Any], int], SourceData]
_SOURCES: dict[str, SourceBuilder] = {}


def register_source(name: str) -> Callable[[SourceBuilder], SourceBuilder]:
    """Decorator: `fn(cfg, image_size) -> SourceData` builds the source `data.name=<name>`."""

    def add(fn: SourceBuilder) -> SourceBuilder:
        if name in _SOURCES:
            raise ValueError(f"data source {name!r} is registered twice")
        _SOURCES[name] = fn
        return fn

    return add


def source_names() -> list[str]:
    """The registered source names."""
    return list(_SOURCES)


def require_root(cfg: Mapping[str, Any]) -> str:
    """cfg['root'], or a ConfigError naming the override to pass."""
    if not cfg.get("root"):
        raise ConfigError(f"data.root is not set; pass data.root=/path/to/your/{cfg.get('name')} data")
    return str(cfg["root"])


def check_source_name(name: Any) -> str:
    """`name` when a source is registered under it, else a ConfigError listing the choices."""
    if name not in _SOURCES:
        raise ConfigError(
            f"unknown data source data.name={name!r}{did_you_mean(str(name), _SOURCES)}; choose one of {source_names()}"
        )
    return str(name)


def build_source(cfg: Mapping[str, Any]) -> SourceData:
    """Build the source named by cfg['name'] from a plain data config mapping."""
    name = check_source_name(cfg.get("name"))
    size = int(cfg.get("image_size", 64))
    if size < 8:
        raise ConfigError(f"data.image_size={size} is too small; use 28 or more")
    return _SOURCES[name](cfg, size)

"""The search space of `python -m xrayfusion.search`: parsed from its explicit YAML form (conf/search_space/),
sampled through an Optuna trial and turned into the Hydra overrides of one training.

    optimizer.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
    fusion: {type: categorical, choices: [average, voting, stacking, concat]}

Optuna stores only None, bool, int, float and str choices: a list or mapping choice (a branch set) is sampled
as its override text, `[resnet18,small_cnn]`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from xrayfusion.core.errors import ConfigError

if TYPE_CHECKING:
    import optuna

TYPES = ("float", "int", "categorical")
FIELDS = {
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
_PLAIN = re.compile(r"^[A-Za-z0-9_./:@+\-]+$")  # a string Hydra's override grammar takes without quotes


@dataclass(frozen=True)
class Param:
    """One searched config key (or group) and its distribution."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    texts: frozenset[str] = frozenset()  # the choices sampled as override text (list and mapping choices)

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's value for this key (a categorical list choice comes back as its override text)."""
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.key, list(self.choices))

    def override(self, value: Any) -> str:
        """The Hydra override that sets this key to a sampled value: `optimizer.lr=0.00031`, `fusion=stacking`."""
        text = value if isinstance(value, str) and value in self.texts else override_value(value)
        return f"{self.key}={text}"


def override_value(value: Any) -> str:
    """A Python value as Hydra override text: lists as `[a,b]`, None as null, odd strings quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    text = str(value)
    return text if _PLAIN.match(text) else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _number(key: str, field: str, value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"search_space.{key}.{field}={value!r} must be a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"search_space.{key}.{field}={value!r} must be a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"search_space.{key}.{field}={value!r} must be a finite number")
    return number


def parse_param(key: str, spec: Any) -> Param:
    """One entry of the space, checked: a ConfigError names the key, the bad field and what it takes."""
    example = "e.g. {type: float, low: 1.0e-4, high: 3.0e-3, log: true} or {type: categorical, choices: [a, b]}"
    if isinstance(spec, DictConfig | ListConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"search_space.{key}={spec!r} must be a mapping with a type, {example}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise ConfigError(f"search_space.{key}.type={kind!r} must be one of {', '.join(TYPES)}; {example}")
    unknown = sorted(str(f) for f in spec if f not in FIELDS[kind])
    if unknown:
        raise ConfigError(
            f"search_space.{key}: {', '.join(unknown)} is not a field of a {kind} entry; it takes "
            f"{', '.join(FIELDS[kind])}"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, Sequence) or isinstance(choices, str) or not choices:
            raise ConfigError(f"search_space.{key}.choices={choices!r} must be a non-empty list, e.g. [a, b]")
        structured = [isinstance(c, Mapping | Sequence) and not isinstance(c, str) for c in choices]
        sampled = tuple(override_value(c) if s else c for c, s in zip(choices, structured, strict=True))
        if len({override_value(c) for c in choices}) != len(sampled):
            raise ConfigError(f"search_space.{key}.choices={list(choices)!r} lists a choice twice")
        texts = frozenset(c for c, s in zip(sampled, structured, strict=True) if s)
        return Param(key, kind, choices=sampled, texts=texts)
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"search_space.{key}: a {kind} entry needs low and high, {example}")
    low, high = _number(key, "low", spec["low"]), _number(key, "high", spec["high"])
    if not low < high:
        raise ConfigError(f"search_space.{key}: low={spec['low']} must be below high={spec['high']}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"search_space.{key}.log={log!r} must be true or false")
    step = spec.get("step")
    if step is not None:
        step = _number(key, "step", step)
        if step <= 0:
            raise ConfigError(f"search_space.{key}.step={spec['step']} must be positive")
        if log:
            raise ConfigError(f"search_space.{key}: step and log: true do not go together (Optuna takes one)")
    if log and low <= 0:
        raise ConfigError(f"search_space.{key}: log: true needs low > 0 (low={spec['low']})")
    if kind == "int" and any(v is not None and v != int(v) for v in (low, high, step)):
        raise ConfigError(f"search_space.{key}: an int entry needs whole numbers for low, high and step")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def parse_space(space: Mapping[str, Any] | None, fixed: Iterable[str] = ()) -> list[Param]:
    """The searched params of a `search_space` config, in file order, less the keys the user fixed."""
    if space is None:
        space = {}
    if not isinstance(space, Mapping | DictConfig):
        raise ConfigError(f"search_space={space!r} must be a mapping of config keys to entries")
    fixed = set(fixed)
    params = [parse_param(str(key), spec) for key, spec in space.items() if str(key) not in fixed]
    if not params:
        raise ConfigError(
            "the search space is empty: every key of search_space is fixed on the command line (or none is given); "
            "leave one out of the command line or add an entry to the search_space config"
        )
    return params


_ABSENT = object()


def check_keys(params: Sequence[Param], cfg: DictConfig) -> None:
    """Every searched key names a value or group of the train config."""
    for param in params:
        if OmegaConf.select(cfg, param.key, default=_ABSENT, throw_on_missing=False) is _ABSENT:
            parent, _, _ = param.key.rpartition(".")
            node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
            known = f"; {parent or 'the top level'} has {', '.join(sorted(map(str, node)))}" if node else ""
            raise ConfigError(f"search_space.{param.key}: {param.key} is not a key of the train config{known}")


def fixed_keys(overrides: Iterable[str]) -> list[str]:
    """The config keys and groups a command line sets (`fusion=average`, `+a.b=1`, `optimizer.lr=1e-3`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.key_or_group for o in parsed]

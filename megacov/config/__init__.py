"""Configuration: typed defaults (:mod:`.schema`), YAML on top, ``key=value`` overrides on top of that.

``load_config`` is the one entry point. Unknown keys are errors that name the closest valid key, so a
typo such as ``algorithm.clip_cov_ration`` fails at start-up instead of silently using a default. A
YAML syntax error names the file, line and column. A single value where the schema has a list
(``data.train_files=x.parquet``) is taken as a one-element list.
"""
from __future__ import annotations

import difflib
import os
import typing
from dataclasses import fields, is_dataclass
from typing import Any, Iterable, Optional

from megacov.config.schema import (  # noqa: F401  (re-exported)
    AlgorithmConfig,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    MegacovConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RewardConfig,
    RolloutConfig,
    TrainerConfig,
)


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the offending key(s)."""


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        keys.append(name)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_valid_keys(type(default), name + "."))
    return keys


def _check_keys(tree: Any, cls: type, prefix: str, source: str) -> None:
    """Raise ConfigError for the first key of ``tree`` that ``cls`` does not declare."""
    if not isinstance(tree, dict):
        return
    by_name = {f.name: f for f in fields(cls)}
    for key, value in tree.items():
        if key not in by_name:
            full = f"{prefix}{key}"
            candidates = [k for k in _valid_keys(MegacovConfig) if k.count(".") == full.count(".")]
            close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}' in {source}{hint}")
        f = by_name[key]
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default) and key != "extra":
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{prefix}{key}' in {source} must be a section (mapping)")
            _check_keys(value, type(default), f"{prefix}{key}.", source)


def _is_list_field(cls: type, name: str) -> bool:
    hint = typing.get_type_hints(cls).get(name)
    return typing.get_origin(hint) is list


def _lists_from_scalars(tree: Any, cls: type) -> Any:
    """Wrap a scalar given for a list-typed field into a one-element list (recursively)."""
    if not isinstance(tree, dict):
        return tree
    by_name = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in tree.items():
        f = by_name.get(key)
        if f is not None and key != "extra":
            default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            if is_dataclass(default):
                value = _lists_from_scalars(value, type(default))
            elif _is_list_field(cls, key) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
                value = [value]
        out[key] = value
    return out


def _read_yaml(path: str) -> Any:
    """The YAML file as plain containers; a syntax error becomes one line with line and column."""
    import yaml
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {where}YAML syntax error: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> MegacovConfig:
    """Build the typed config: schema defaults <- YAML file <- ``key=value`` overrides.

    Returns a plain :class:`MegacovConfig` object (OmegaConf validated the types on the way), so the
    rest of megacov works with ordinary dataclasses.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(MegacovConfig)
    try:
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file not found: {path}")
            data = _read_yaml(path)
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: top level must be a mapping of sections")
            _check_keys(data, MegacovConfig, "", path)
            merged = OmegaConf.merge(merged, _lists_from_scalars(data, MegacovConfig))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value")
            dotted = OmegaConf.to_container(OmegaConf.from_dotlist([item.lstrip("+")]))
            _check_keys(dotted, MegacovConfig, "", "command-line override")
            merged = OmegaConf.merge(merged, _lists_from_scalars(dotted, MegacovConfig))
    except OmegaConfBaseException as exc:  # type errors such as parallel.tp=two
        raise ConfigError(str(exc).splitlines()[0] + f" (key: {getattr(exc, 'full_key', '?')})") from None
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, MegacovConfig)
    return cfg


def to_yaml(cfg: MegacovConfig) -> str:
    """Serialise a config (e.g. into a run folder so the run can be reproduced)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


__all__ = ["ConfigError", "MegacovConfig", "load_config", "to_yaml"]

"""Configuration: typed defaults (:mod:`.schema`), YAML on top, ``key=value`` overrides on top of that.

``load_config`` is the one entry point. Unknown keys are errors that name the closest valid key, so a
typo such as ``algorithm.clip_cov_ration`` fails at start-up instead of silently using a default.
"""
from __future__ import annotations

import difflib
import os
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
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: top level must be a mapping of sections")
            _check_keys(data, MegacovConfig, "", path)
            merged = OmegaConf.merge(merged, data)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value")
            dotted = OmegaConf.from_dotlist([item.lstrip("+")])
            _check_keys(OmegaConf.to_container(dotted), MegacovConfig, "", "command-line override")
            merged = OmegaConf.merge(merged, dotted)
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

"""Configuration as data: nested dicts of defaults, overridden by a YAML file and by
``--set key.sub=value`` pairs from the command line. Unknown keys are errors (a typo must not
be silently ignored), and every run saves the fully resolved configuration next to its outputs.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from medlsdm.errors import ConfigError
from medlsdm.files import atomic_output


def preset_names() -> list[str]:
    """Names of the presets shipped with the package (configs/*.yaml)."""
    folder = resources.files("medlsdm") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys to values")
    return data


def load_preset(name_or_path: str) -> dict:
    """A preset by name (``brats``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_yaml(path)
    resource = resources.files("medlsdm") / "configs" / f"{name_or_path}.yaml"
    if not resource.is_file():
        raise ConfigError(
            f"unknown preset '{name_or_path}' (available: {', '.join(preset_names())}; or give a YAML file path)"
        )
    return load_yaml(Path(str(resource)))


def merge(base: Mapping, override: Mapping, where: str = "") -> dict:
    """Deep-merge `override` into a copy of `base`; keys absent from `base` are errors."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        name = f"{where}{key}"
        if key not in out:
            known = ", ".join(sorted(map(str, out))) or "none"
            raise ConfigError(f"unknown config key '{name}' (known here: {known})")
        if isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = merge(out[key], value, where=f"{name}.")
        elif isinstance(out[key], dict) and value is not None:
            raise ConfigError(f"config key '{name}' is a section; give it a mapping, not {value!r}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> dict:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected key=value (e.g. training.max_steps=1000)")
    key, raw = item.split("=", 1)
    try:
        value: Any = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    for part in reversed(key.strip().split(".")):
        if not part:
            raise ConfigError(f"--set '{item}': empty key part")
        value = {part: value}
    return value


def resolve(defaults: Mapping, config: str | Mapping | None = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults, then a preset/YAML file (or mapping), then ``--set`` overrides."""
    cfg = copy.deepcopy(dict(defaults))
    if config is not None:
        cfg = merge(cfg, load_preset(config) if isinstance(config, str) else config)
    for item in overrides:
        cfg = merge(cfg, parse_override(item))
    return cfg


STAGE_SECTIONS = ("prepare", "autoencoder", "diffusion")


def stage_config(defaults: Mapping, config: str | Mapping | None = None, overrides: Iterable[str] = (),
                 section: str = "") -> dict:
    """Configuration of one stage: defaults, then its part of a preset/YAML, then ``--set``.

    A preset may hold several stages (``prepare:``, ``autoencoder:``, ``diffusion:``); the stage
    takes its own section. A file without any stage section is taken as the stage's section itself.
    """
    cfg = copy.deepcopy(dict(defaults))
    if config is not None:
        data = load_preset(config) if isinstance(config, str) else dict(config)
        if section in data:
            data = data[section] or {}
        elif set(data) & set(STAGE_SECTIONS):
            data = {}
        cfg = merge(cfg, data, where=f"{section}.")
    for item in overrides:
        cfg = merge(cfg, parse_override(item))
    return cfg


def save_config(cfg: Mapping, path: str | Path) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(yaml.safe_dump(dict(cfg), sort_keys=False), encoding="utf-8")

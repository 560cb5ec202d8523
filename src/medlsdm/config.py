"""Configuration as data: nested dicts of defaults, overridden by a YAML file and by
``--set key.sub=value`` pairs from the command line. Every run saves the fully resolved
configuration next to its outputs.

The documented defaults are the schema: a key absent from them is an error at every level (a
typo must not be silently ignored; the nearest valid key is suggested), and a value must have
the type of its default (`check_type`: an integer where the default is an integer, a number where
it is a float, true/false, text, a list; a default of null takes anything). The few keys that
take more than one type are listed in `EXTRA_TYPES`.
"""

from __future__ import annotations

import copy
import difflib
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


# Keys whose values may have another type than their default (dotted path -> accepted types).
EXTRA_TYPES: dict[str, tuple[type, ...]] = {
    "trainer.devices": (int, str, list),   # a count, "auto", or a list of device indices
    "trainer.precision": (str, int),       # Lightning also takes 32, 16
    "ema.decay": (float, int, type(None)),  # null switches the EMA off
    "sampling.steps": (int, type(None)),    # null: every training timestep (DDPM)
}

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text", list: "a list",
               type(None): "null"}


def nearest(key: str, known) -> str:
    """' (did you mean 'x'?)' for the closest known key, or ''."""
    match = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _accepted(default, name: str) -> tuple[type, ...] | None:
    for path, types in EXTRA_TYPES.items():
        if name == path or name.endswith("." + path):
            return types
    if default is None:
        return None
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int):
        return (int,)
    if isinstance(default, float):
        return (float, int)
    if isinstance(default, (list, tuple)):
        return (list,)
    if isinstance(default, str):
        return (str,)
    return None


def check_type(name: str, default, value) -> None:
    """A ConfigError naming the key, the expected type and the value when `value` does not have
    the type of `default` (booleans are not numbers here)."""
    types = _accepted(default, name)
    if types is None:
        return
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if isinstance(value, tuple) and list in types:
        ok = True
    if not ok:
        expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise ConfigError(f"config key '{name}' expects {expected}, got {value!r} ({type(value).__name__})")


def _yaml_number(default, value):
    """YAML 1.1 reads ``1e-4`` (no dot) as text: take it as the number meant where one is expected."""
    if isinstance(default, float) and not isinstance(default, bool) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def merge(base: Mapping, override: Mapping, where: str = "", schema: Mapping | None = None) -> dict:
    """Deep-merge `override` into a copy of `base`; keys absent from `base` are errors, and
    values must have the type of their value in `schema` (the documented defaults; default
    `base`), see `check_type`."""
    out = copy.deepcopy(dict(base))
    schema = out if schema is None else schema
    for key, value in override.items():
        name = f"{where}{key}"
        if key not in out:
            known = ", ".join(sorted(map(str, out))) or "none"
            raise ConfigError(f"unknown config key '{name}'{nearest(key, out)} (known here: {known})")
        default = schema.get(key, out[key]) if isinstance(schema, Mapping) else out[key]
        if isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = merge(out[key], value, where=f"{name}.", schema=default if isinstance(default, Mapping) else None)
        elif isinstance(out[key], dict) and value is not None:
            raise ConfigError(f"config key '{name}' is a section; give it a mapping, not {value!r}")
        else:
            value = _yaml_number(default, value)
            check_type(name, default, value)
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
        cfg = merge(cfg, load_preset(config) if isinstance(config, str) else config, schema=defaults)
    for item in overrides:
        cfg = merge(cfg, parse_override(item), schema=defaults)
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
        if set(data) & set(STAGE_SECTIONS):
            # A file with stage sections holds nothing else: a misspelt section ('trainr:') would
            # otherwise be ignored by every stage.
            for key in data:
                if key not in STAGE_SECTIONS:
                    hint = nearest(key, STAGE_SECTIONS)
                    if not hint and nearest(key, defaults):
                        hint = nearest(key, defaults)[:-2] + f" inside '{section}:'?)"
                    raise ConfigError(f"{config if isinstance(config, str) else 'config'}: unknown top-level key "
                                      f"'{key}'{hint} (a file with stage sections may hold only "
                                      f"{', '.join(STAGE_SECTIONS)})")
            data = data.get(section) or {}
            if not isinstance(data, Mapping):
                raise ConfigError(f"config section '{section}' must be a mapping, not {data!r}")
        cfg = merge(cfg, data, where=f"{section}." if section else "", schema=defaults)
    for item in overrides:
        cfg = merge(cfg, parse_override(item), schema=defaults)
    return cfg


def save_config(cfg: Mapping, path: str | Path) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(yaml.safe_dump(dict(cfg), sort_keys=False), encoding="utf-8")

"""Where settings come from: flags, the environment, ``federation.toml``, defaults.

Values come from, in decreasing priority: command-line flags, environment
variables, the TOML file ``$FEDERATION_HOME/federation.toml``, then the defaults
written in the section dataclasses. Environment variables are named
``FEDERATION_<SECTION>_<FIELD>`` (for example ``FEDERATION_GATEWAY_HTTP_PORT``);
``FEDERATION_HOME`` and ``FEDERATION_DATABASE_URL`` are the two documented short
forms. A misspelt ``FEDERATION_<SECTION>_*`` variable is refused like a misspelt key.
Nothing in the project reads a setting from ``os.environ`` outside this module; the
supervisor (``federation.launch.up``) and the backup (``federation.backup.postgres``)
copy the environment whole, for the processes they start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from federation.config.processes import ConfigError

T = TypeVar("T")

_SHORT_ENV_NAMES = {
    "FEDERATION_HOME": ("home",),
    "FEDERATION_DATABASE_URL": ("database", "url"),
}


def load(settings_type: type[T], default_home: Path, overrides: Mapping[str, Any] | None,
         environ: Mapping[str, str] | None) -> T:
    """``settings_type`` (``federation.config.Settings``) resolved from flags
    (``overrides``), the environment and the file of the home they name
    (``default_home`` when none does).

    ``overrides`` uses dotted names: ``{"gateway.http_port": 9000, "home": "/x"}``;
    ``None`` values are ignored so that unset flags fall through.
    """
    environ = os.environ if environ is None else environ
    flat: dict[str, Any] = {}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    env_values = _from_environ(settings_type, environ)
    home = _home(flags.get("home", env_values.get("home")), default_home)
    flat.update(_from_file(home / "federation.toml"))
    flat.update(env_values)
    flat.update(flags)
    flat["home"] = str(home)
    settings: T = _build(settings_type, flat, prefix="")
    return settings


def _home(given: Any, default_home: Path) -> Path:
    """The home a flag or the environment names; an empty one is an error, not the
    default (``./.federation``, wherever the command happens to run)."""
    if given is None:
        return default_home
    if not str(given).strip():
        raise ConfigError("setting home: empty; name a directory with --home or "
                          "FEDERATION_HOME, or leave both unset for ./.federation")
    return Path(given)


def _from_environ(settings_type: type, environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, path in _SHORT_ENV_NAMES.items():
        # Set but empty is a value, as with every other variable and as with the flags:
        # FEDERATION_DATABASE_URL="" means embedded, whatever the file says.
        if name in environ:
            values[".".join(path)] = environ[name]
    hints = typing.get_type_hints(settings_type)
    for section in dataclasses.fields(settings_type):
        section_type = _section_type(hints[section.name])
        if section_type is None:
            env_name = f"FEDERATION_{section.name.upper()}"
            if env_name not in _SHORT_ENV_NAMES and env_name in environ:
                values[section.name] = environ[env_name]
            continue
        for item in dataclasses.fields(section_type):
            env_name = f"FEDERATION_{section.name.upper()}_{item.name.upper()}"
            if env_name in environ and env_name not in _SHORT_ENV_NAMES:
                values[f"{section.name}.{item.name}"] = environ[env_name]
        _refuse_unknown(environ, section.name, section_type)
    return values


def _refuse_unknown(environ: Mapping[str, str], section: str, section_type: type) -> None:
    """A variable in a section's namespace that names none of its settings is a typo
    (``FEDERATION_GATEWAY_HTTP_PROT``), refused as one in the file is. Other
    ``FEDERATION_*`` names are left alone: a shell may hold ``FEDERATION_KEY``."""
    prefix = f"FEDERATION_{section.upper()}_"
    known = {prefix + item.name.upper() for item in dataclasses.fields(section_type)}
    for name in environ:
        if name.startswith(prefix) and name not in known:
            raise ConfigError(f"unknown setting {section}.{name[len(prefix):].lower()} "
                              f"(environment variable {name})")


def _from_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    if "home" in data:
        # The file is found through the home: a home written in it could never apply.
        raise ConfigError(f"{path}: setting home cannot be set in the file; "
                          "use --home or FEDERATION_HOME")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            values.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            values[key] = value
    return values


def _section_type(hinted: Any) -> type | None:
    """The section's dataclass, or ``None`` for a plain top-level setting."""
    return hinted if dataclasses.is_dataclass(hinted) and isinstance(hinted, type) else None


def _build(cls: type, flat: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in flat:
        head = name[len(prefix) :].split(".", 1)[0] if name.startswith(prefix) else None
        if head is not None and head not in known:
            raise ConfigError(f"unknown setting {name!r}")
    kwargs: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        hinted = hints[item.name]
        key = prefix + item.name
        if dataclasses.is_dataclass(hinted) and isinstance(hinted, type):
            if key in flat:
                raise ConfigError(f"setting {key} is a section: write [{key}] and its keys")
            nested = {k: v for k, v in flat.items() if k.startswith(key + ".")}
            kwargs[item.name] = _build(hinted, nested, key + ".")
        elif key in flat:
            kwargs[item.name] = _coerce(key, flat[key], hinted)
    return cls(**kwargs)


def _coerce(name: str, value: Any, hinted: Any) -> Any:
    if typing.get_origin(hinted) is tuple:
        return _coerce_table_list(name, value, hinted)
    target = hinted
    if isinstance(hinted, types.UnionType):
        target = next(t for t in typing.get_args(hinted) if t is not type(None))
    try:
        return _convert(value, target)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: cannot use {value!r} as {target.__name__}") from exc


def _convert(value: Any, target: type) -> Any:
    """``value`` as ``target``: text (the environment, flags) is parsed; a TOML value must
    already have the type, because a conversion would silently change it (``8080.7``
    truncated to a port, ``true`` taken as 1 byte, a list turned into its ``repr``)."""
    if isinstance(value, str):
        if target is bool:
            lowered = value.strip().lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError(value)
            return lowered in _TRUE
        return Path(value) if target is Path else target(value)
    if isinstance(value, bool):
        if target is bool:
            return value
        raise TypeError(value)
    if target is float and isinstance(value, int | float):
        return float(value)
    if target is int and isinstance(value, int):
        return value
    raise TypeError(value)


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _coerce_table_list(name: str, value: Any, hinted: Any) -> tuple[Any, ...]:
    """A ``tuple[SomeDataclass, ...]`` setting: TOML array of tables, or JSON text."""
    item_type = typing.get_args(hinted)[0]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"setting {name}: not a JSON list: {exc}") from exc
    if not isinstance(value, list | tuple) or not all(isinstance(v, Mapping) for v in value):
        raise ConfigError(f"setting {name}: expected a list of tables")
    if any(isinstance(v, item_type) for v in value):
        return tuple(value)
    # Each table's keys are named in full (``inference.models[1].gguf_path``) so that an
    # error says which table of the list holds the typo or the bad value.
    return tuple(
        _build(item_type, {f"{name}[{i}].{k}": v for k, v in table.items()}, f"{name}[{i}].")
        for i, table in enumerate(value)
    )

"""Configuration: defaults < TOML file < environment < command-line flags, in one typed schema.

The file is `hyperjax.toml` in the working directory, else `$HYPERJAX_HOME/hyperjax.toml` (or a path given with
`--config`). Every key can also come from the environment as `HYPERJAX_<SECTION>_<KEY>` in upper case, e.g.
`HYPERJAX_SAMPLING_TEMPERATURE=0` or `HYPERJAX_HYBRID_REMOTE_URL=http://host:8765/mcp`. Unknown keys and values of
the wrong type are refused with a `ConfigError` naming the file and line (or the variable).

    [model]
    name = "smollm2-135m"        # registered name or GGUF path
    [sampling]
    temperature = 0.7
    max_tokens = 64
    [hybrid]
    policy = "prefer-local"
    remote_url = "http://127.0.0.1:8765/mcp"
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from hyperjax.errors import ConfigError

FILENAME = "hyperjax.toml"
ENV_PREFIX = "HYPERJAX_"
POLICIES = ("local", "remote", "prefer-local", "prefer-remote", "auto")


@dataclass(frozen=True)
class ModelConfig:
    name: str | None = None  # registered model name or GGUF path; None is the default model


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 0
    max_tokens: int = 128


@dataclass(frozen=True)
class MemoryConfig:
    budget: str | int | None = None  # e.g. "64MB": stream decoder blocks from the file under this budget


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_prompt_bytes: int = 64 * 1024
    max_tokens: int = 1024


@dataclass(frozen=True)
class HybridConfig:
    policy: str = "prefer-local"
    remote_url: str | None = None
    token: str | None = None
    timeout_s: float = 60.0
    retries: int = 1


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)

    def get(self, key: str) -> Any:
        """The value of "section.key"."""
        section, name = split_key(key)
        return getattr(getattr(self, section), name)

    def with_values(self, values: Mapping[str, Any]) -> Config:
        """A copy with {"section.key": value} applied (values already checked)."""
        config = self
        for key, value in values.items():
            section, name = split_key(key)
            config = replace(config, **{section: replace(getattr(config, section), **{name: value})})
        return config

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: {key: getattr(getattr(self, name), key) for key in keys} for name, keys in schema().items()}


@dataclass
class LoadedConfig:
    """The merged configuration, the file it read (if any) and where each key's value came from."""

    config: Config
    path: Path | None
    sources: dict[str, str]


@functools.cache
def schema() -> dict[str, dict[str, Any]]:
    """{section: {key: annotation}} for every known key, in declaration order."""
    sections = get_type_hints(Config)
    return {f.name: get_type_hints(sections[f.name]) for f in fields(Config)}


def split_key(key: str) -> tuple[str, str]:
    """("section", "key") of a known "section.key"; ConfigError otherwise."""
    section, _, name = key.partition(".")
    known = schema()
    if section not in known:
        raise ConfigError(f"unknown section {section!r} in {key!r}; sections: {', '.join(known)}")
    if name not in known[section]:
        raise ConfigError(f"unknown key {key!r}; keys of [{section}]: {', '.join(known[section])}")
    return section, name


def _allowed(annotation: Any) -> tuple[type, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(a for a in get_args(annotation) if a is not type(None))
    return (annotation,)


def _type_name(annotation: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return " or ".join(names[t] for t in _allowed(annotation))


def check_value(key: str, value: Any) -> Any:
    """`value` for "section.key" if its type fits (ints become floats where a float is due); ConfigError if not."""
    section, name = split_key(key)
    annotation = schema()[section][name]
    allowed = _allowed(annotation)
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{key} must be {_type_name(annotation)}, got {json.dumps(value)}")
    if isinstance(value, int) and not isinstance(value, bool) and int not in allowed and float in allowed:
        value = float(value)
    if not isinstance(value, allowed):
        raise ConfigError(f"{key} must be {_type_name(annotation)}, got {type(value).__name__} {value!r}")
    _check_range(key, value)
    return value


def _check_range(key: str, value: Any) -> None:
    positive = ("sampling.max_tokens", "server.max_prompt_bytes", "server.max_tokens", "hybrid.timeout_s")
    non_negative = ("sampling.temperature", "sampling.top_k", "hybrid.retries")
    if key == "hybrid.policy" and value not in POLICIES:
        raise ConfigError(f"{key} cannot be {value!r}; choose one of {', '.join(POLICIES)}")
    if key == "server.port" and not 0 < value < 65536:
        raise ConfigError(f"{key} must be in [1, 65535], got {value}")
    if (key in positive and not value > 0) or (key in non_negative and not value >= 0):
        raise ConfigError(f"{key} must be {'positive' if key in positive else 'non-negative'}, got {value!r}")


def parse_text_value(key: str, text: str) -> Any:
    """A value given as text (environment, `config set`), read by the key's type: `0.7`, `40`, `none`, a string."""
    section, name = split_key(key)
    allowed = _allowed(schema()[section][name])
    stripped = text.strip()
    if stripped.lower() in ("none", "null", "") and type(None) in get_args(schema()[section][name]):
        return None
    for kind in (int, float):
        if kind in allowed:
            try:
                value = kind(stripped)
            except ValueError:
                continue
            return check_value(key, value)
    if str in allowed:
        return check_value(key, stripped)
    raise ConfigError(f"{key} must be {_type_name(schema()[section][name])}, got {text!r}")


def find_config_file(cwd: Path | None = None) -> Path | None:
    """./hyperjax.toml, else $HYPERJAX_HOME/hyperjax.toml, else None."""
    from hyperjax.io.registry import hyperjax_home

    for candidate in ((cwd or Path.cwd()) / FILENAME, hyperjax_home() / FILENAME):
        if candidate.is_file():
            return candidate
    return None


def key_line(text: str, section: str, key: str | None = None) -> int:
    """1-based line of `key` in `[section]` (or of the section header when key is None); 0 if not found."""
    current = ""
    header_line = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        header = re.fullmatch(r"\[\s*([^\[\]]+?)\s*\]", line)
        if header:
            current = header.group(1).strip('"')
            if (current == section and key is None) or current == f"{section}.{key}":
                return number
            header_line = number if current == section else header_line
            continue
        match = re.match(r'("?)([A-Za-z0-9_.-]+)\1\s*=', line)
        if not match:
            continue
        name = match.group(2)
        dotted = f"{current}.{name}" if current else name
        if (key is None and dotted.split(".")[0] == section) or dotted == f"{section}.{key}":
            return number
    return header_line


def read_config_file(path: Path) -> dict[str, Any]:
    """{"section.key": value} from a TOML file, every key and type checked; ConfigError with file:line if not."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    known = schema()
    values: dict[str, Any] = {}
    for section, table in data.items():
        if section not in known:
            line = key_line(text, section)
            raise ConfigError(f"{path}:{line}: unknown section [{section}]; sections: {', '.join(known)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}:{key_line(text, section)}: {section} must be a table ([{section}])")
        for name, value in table.items():
            key = f"{section}.{name}"
            try:
                values[key] = check_value(key, value)
            except ConfigError as exc:
                raise ConfigError(f"{path}:{key_line(text, section, name)}: {exc}") from None
    return values


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """{"section.key": value} from HYPERJAX_<SECTION>_<KEY> variables; unknown ones under a section are refused."""
    known = schema()
    values: dict[str, Any] = {}
    for variable, text in environ.items():
        for section, keys in known.items():
            prefix = f"{ENV_PREFIX}{section.upper()}_"
            if not variable.startswith(prefix):
                continue
            name = variable[len(prefix) :].lower()
            if name not in keys:
                raise ConfigError(f"unknown variable ${variable}; keys of [{section}]: {', '.join(keys)}")
            try:
                values[f"{section}.{name}"] = parse_text_value(f"{section}.{name}", text)
            except ConfigError as exc:
                raise ConfigError(f"${variable}: {exc}") from None
    return values


def load_config(
    path: str | os.PathLike | None = None,
    *,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Defaults, then the file (`path`, or the one `find_config_file` finds), then the environment, then `flags`.

    `flags` maps "section.key" to a value; None means the flag was not given.
    """
    file = Path(path) if path is not None else find_config_file()
    layers = [
        ("file", read_config_file(file) if file is not None else {}),
        ("env", read_environment(os.environ if environ is None else environ)),
        ("flag", {k: check_value(k, v) for k, v in (flags or {}).items() if v is not None}),
    ]
    sources = {f"{s}.{k}": "default" for s, keys in schema().items() for k in keys}
    config = Config()
    for source, values in layers:
        config = config.with_values(values)
        sources |= dict.fromkeys(values, source)
    return LoadedConfig(config, file, sources)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are valid TOML escapes


def to_toml(config: Config) -> str:
    """The configuration as TOML text; unset (None) keys are left out."""
    lines: list[str] = []
    for section, values in config.as_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
        lines.append("")
    return "\n".join(lines)


def save_config(config: Config, path: str | os.PathLike) -> Path:
    """Write `config` as TOML to `path` (readable by its owner only: it may hold tokens)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_toml(config), encoding="utf-8")
        path.chmod(0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write config file {path}: {exc.strerror}") from None
    return path

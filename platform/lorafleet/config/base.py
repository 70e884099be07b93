"""What every lorafleet config shares: the home, YAML loading, dotted `--set` overrides, and one
error type with one formatter.

Each concern has its own schema module beside this one (`finetune`, `sweep`, `compare`, `serve`);
they all load and report problems through the functions here, so a typo reads the same whichever
config it is in, and every problem of a config is reported at once, before any worker starts.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lorafleet.uri import is_uri, join

__all__ = [
    "ConfigError",
    "Section",
    "problems_error",
    "format_errors",
    "validate",
    "read_yaml",
    "load_raw",
    "apply_overrides",
    "parse_value",
    "default_home",
    "home_location",
    "registry_root",
    "set_home",
    "expand_home",
    "absolute_if_local",
    "dump_config",
    "HOME_ENV",
]

HOME_ENV = "LORAFLEET_HOME"
REGISTRY_ENV = "LORAFLEET_REGISTRY"  # the registry, when it is not <home>/registry (e.g. s3://bucket/registry)
# A model validator that finds several cross-field problems raises them as ONE ValueError whose
# message joins them with this separator; `format_errors` splits them back into one line each.
_SEP = " || "
_M = TypeVar("_M", bound=BaseModel)


class ConfigError(ValueError):
    """Every problem found in a config, reported at once."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid config {source}: {len(problems)} problem(s)\n{lines}")


class Section(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def problems_error(problems: list[str]) -> ValueError:
    """The error a `model_validator` raises for several cross-field problems at once."""
    return ValueError(_SEP.join(problems))


def format_errors(err: ValidationError, example: str = "configs/") -> list[str]:
    """One line per problem, `dotted.location: message`; `example` is where valid keys are shown."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key (check the spelling; see {example} for the valid keys)"
        for part in msg.split(_SEP) if not loc else [msg]:
            problems.append(f"{loc}: {part}" if loc else part)
    return problems


def validate(model: type[_M], raw: Any, source: str, example: str = "configs/") -> _M:
    """`model.model_validate(raw)`, with every problem raised as one ConfigError."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, format_errors(err, example)) from None


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"{what} file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["the top level must be a mapping of sections"])
    return raw


def load_raw(path: str | Path, overrides: list[str] | None = None, what: str = "config") -> dict[str, Any]:
    """`read_yaml` then the dotted `--set` overrides: the raw dict a schema validates."""
    return apply_overrides(read_yaml(path, what), overrides or [])


def parse_value(text: str) -> Any:
    """A `--set` value as YAML reads it: "3e-4" -> float, "true" -> bool, "[a, b]" -> list."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        return float(value)  # YAML 1.1 reads "3e-4" as a string
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `key=value` overrides (`train.lr=3e-4`) to a raw config dict (a copy)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError("overrides", [f"override {item!r} must look like section.key=value"])
        key, text = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("overrides", [f"override {item!r}: {part!r} is not a section"])
        node[parts[-1]] = parse_value(text)
    return out


def default_home() -> Path:
    """The local lorafleet home: `$LORAFLEET_HOME`, else ./.lorafleet (absolute, so Ray workers agree).

    Raises:
        ConfigError: `$LORAFLEET_HOME` is an object-store URI (see `home_location`): what asked needs
            local files (models, RAG collections, reports).
    """
    raw = os.environ.get(HOME_ENV, ".lorafleet")
    if is_uri(raw):
        raise ConfigError(HOME_ENV, [
            f"the lorafleet home is {raw}, an object store; this command needs a local home folder "
            f"(models/, rag/, reports): set {HOME_ENV} to a folder and {REGISTRY_ENV} to "
            f"{raw.rstrip('/')}/registry"])
    return Path(raw).resolve()


def home_location() -> str:
    """The lorafleet home as configured: a local folder (absolute) or an object-store URI.

    A home at `s3://bucket/prefix` holds what training and serving share (`registry/`, `runs/`);
    `${home}` in a config expands to it, so local things (a model folder) must then be named
    outright."""
    raw = os.environ.get(HOME_ENV, ".lorafleet")
    return raw.rstrip("/") if is_uri(raw) else str(Path(raw).resolve())


def registry_root(home: str | Path | None = None) -> str | Path:
    """The artifact registry: `$LORAFLEET_REGISTRY` if set, else `<home>/registry` (`home` defaults
    to `home_location()`); a Path for a folder, a string for `s3://...`."""
    if os.environ.get(REGISTRY_ENV):
        override = os.environ[REGISTRY_ENV]
        return override.rstrip("/") if is_uri(override) else Path(override).expanduser().resolve()
    return join(home if home is not None else home_location(), "registry")


def set_home(home: str | Path | None) -> Path | str:
    """Make `home` this process's lorafleet home (and its children's: Ray workers read the
    environment variable); None keeps the current one. Returns the home in force (a Path, or the
    URI of an object-store home)."""
    if home:
        os.environ[HOME_ENV] = str(home).rstrip("/") if is_uri(home) else str(Path(home).expanduser().resolve())
    location = home_location()
    return location if is_uri(location) else Path(location)


def expand_home(value: str, home: Path | str) -> str:
    """Expand `${home}` in a config value."""
    return value.replace("${home}", str(home))


def absolute_if_local(value: str) -> str:
    """A local path made absolute (so it means the same in every worker); URIs, `hf:` ids,
    'synthetic' and hub ids stay as they are."""
    if value == "synthetic" or value.startswith(("hf:", "s3://", "gs://", "abfss://")):
        return value
    p = Path(value).expanduser()
    return str(p.resolve()) if (p.exists() or value.startswith((".", "/", "~"))) else value


def dump_config(cfg: BaseModel) -> str:
    """A resolved config as YAML (what is saved beside every artifact)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

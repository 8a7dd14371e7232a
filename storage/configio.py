"""One config system: strict pydantic models, YAML presets in `configs/`, dotted `key=value` overrides.

    cfg = load_config(IngestConfig, "ingest/sam", ["source=/data/sa1b", "decode.max_pixels=50000000"])

A preset is a YAML file path or a name under `configs/` (`ingest/sam` -> `configs/ingest/sam.yaml`). Overrides are
applied last; values are parsed as YAML (`force=true` is a bool, `limit=3` an int). Unknown keys are errors.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from storage.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class StrictModel(BaseModel):
    """Base for every config section: unknown keys raise, assignments are validated. `renamed_keys` maps a key's
    former name to its name now, so an old key given by a user is refused naming the new one."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    renamed_keys: ClassVar[dict[str, str]] = {}


M = TypeVar("M", bound=StrictModel)


# ---------------------------------------------------------------------------------------------------------------------
# Presets and overrides
# ---------------------------------------------------------------------------------------------------------------------


def _natural(name: str) -> list:
    """Sort key that orders numbers by value: stage3-256, stage3-512, stage3-1024."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def resolve_preset(preset: str | Path, kind: str | None = None) -> Path:
    """A YAML path as given, or a preset name under `configs/`.

    With kind="ingest", "sam" and "ingest/sam" both resolve to configs/ingest/sam.yaml, and only ingest presets
    are accepted: `pixart ingest caption/sam` is an error, not a caption config fed to ingest.
    """
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if path.exists():
            return path
        raise ConfigError(f"config file {preset} does not exist")
    base = CONFIG_DIR / kind if kind else CONFIG_DIR
    name = str(preset).removeprefix(f"{kind}/") if kind else str(preset)
    named = base / f"{name}.yaml"
    if ".." not in Path(name).parts and named.exists():
        return named
    raise ConfigError(f"config {preset!r} is neither a YAML file nor a{' ' + kind if kind else ''} preset; "
                      f"presets: {', '.join(preset_names(kind))}")


def preset_names(kind: str | None = None) -> list[str]:
    """The presets under configs/<kind>/ (all of configs/ without kind), numbers in order of value."""
    base = CONFIG_DIR / kind if kind else CONFIG_DIR
    return sorted((str(p.relative_to(base).with_suffix("")) for p in base.rglob("*.yaml")), key=_natural)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}. Values are YAML scalars, lists or maps."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _submodel(cls: type, name: str) -> tuple[type | None, int]:
    """The config section class that field `name` of `cls` holds, if it is one (Optional and unions included), and
    how many parts of an error's loc come between the field and that section: one per dict key or list index when
    the field is a `dict[str, Section]`, `list[Section]` or nested such."""
    field = getattr(cls, "model_fields", {}).get(name)
    if field is None:
        return None, 0
    todo = [(field.annotation, 0)]
    while todo:
        tp, keys = todo.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return tp, keys
        origin, args = get_origin(tp), get_args(tp)
        if isinstance(origin, type) and issubclass(origin, Mapping) and args:
            todo.append((args[-1], keys + 1))  # the value type, one loc part (the key) further down
        elif isinstance(origin, type) and issubclass(origin, Sequence) and args:
            todo.extend((a, keys + 1) for a in args if a is not Ellipsis)
        else:
            todo.extend((a, keys) for a in args)
    return None, 0


def _unknown_key(cls: type, loc: tuple) -> str:
    """'unknown key; did you mean ...?' with the keys the section at `loc` does accept."""
    section: type | None = cls
    skip = 0
    for part in loc[:-1]:
        if skip:  # a dict key or list index between a field and the section its values are
            skip -= 1
        elif isinstance(part, str) and section is not None:
            section, skip = _submodel(section, part)
    known = sorted(getattr(section, "model_fields", {}))
    if not known:
        return "unknown key"
    renamed = getattr(section, "renamed_keys", {}).get(str(loc[-1]))
    if renamed:
        return f"unknown key; renamed to {renamed!r}"
    close = difflib.get_close_matches(str(loc[-1]), known, n=3, cutoff=0.6)
    if close:
        return "unknown key; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"unknown key; this section takes: {', '.join(known)}"


def _format_validation_error(cls: type, err: ValidationError) -> str:
    lines = [f"invalid {cls.__name__}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and loc:
            msg = _unknown_key(cls, loc)
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")  # our own validators' messages, as written
        lines.append(f"  {'.'.join(str(p) for p in loc)}: {msg}" if loc else f"  {msg}")
    return "\n".join(lines)


def load_config(
    cls: type[M],
    preset: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    kind: str | None = None,
) -> M:
    """Build `cls` from an optional preset plus overrides; raises ConfigError with one line per bad field."""
    data: dict[str, Any] = {}
    if preset:
        path = resolve_preset(preset, kind)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data = _merge(data, parse_overrides(list(overrides)))
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(cls, e)) from None


# ---------------------------------------------------------------------------------------------------------------------
# Saving the resolved config beside outputs
# ---------------------------------------------------------------------------------------------------------------------


def config_dict(cfg: BaseModel) -> dict[str, Any]:
    """JSON-safe dict of a config, as saved beside outputs."""
    return json.loads(cfg.model_dump_json())


def config_hash(cfg: BaseModel) -> str:
    """Short stable hash of the resolved config."""
    blob = json.dumps(config_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(config_dict(cfg), sort_keys=False)

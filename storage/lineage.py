"""Lineage: what a committed output was made from, so that a re-run can tell a current output from a stale one.

Every done marker holds a lineage record and the output's content identity:

    {"lineage": {"inputs": [{"url": ..., "id": ...}], "config": "<hash>", "settings": {...}, "models": {"t5": ...}},
     "content_id": "<hash of the output and its lineage>"}

- An input's `id` is the content identity of a committed input (the `content_id` in its marker), or the size and
  mtime/etag of a raw source file. A re-ingest that produces the same manifest bytes keeps the same id, so its
  dependants stay current; a changed source image changes it, so they do not.
- `config` hashes the effective config (`settings`) only: the fields that change what is written. Fields that
  only change how the work runs (workers, executor, batch sizes, `force`, `max_shards`...) are left out, so
  rerunning with more workers redoes nothing. Such a field is declared with `RuntimeField(...)`.
- `models` holds the model ids or local directories the output was made with, `model_ids` what each one was
  (`storage.hub.model_identity`: a local directory's file fingerprint, a cached hub id's revision), so weights saved
  again at the same path make the output stale too.

Inputs are compared by content id, in order, not by URL: a whole root copied or moved elsewhere stays current.
`stale_reason(marker, lineage)` says why a committed output no longer matches (None when it does): the writer
(`storage.shard.ShardWriter`) redoes such a shard instead of skipping it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, Field

from storage.commit import read_done
from storage.hub import model_identity
from storage.urls import filesystem

RUNTIME = {"runtime": True}  # json_schema_extra of a field that does not change the output


def RuntimeField(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - used like pydantic's Field
    """A pydantic Field that changes how a stage runs, not what it writes: left out of the lineage."""
    return Field(*args, json_schema_extra=RUNTIME, **kwargs)
ALWAYS_RUNTIME = frozenset({"force", "redo", "shards", "max_shards", "create_bucket", "output_root"})  # how, not what


def _effective(model: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if name in ALWAYS_RUNTIME or extra.get("runtime"):
            continue
        value = getattr(model, name)
        out[name] = _effective(value) if isinstance(value, BaseModel) else value
    return out


def effective_config(cfg: BaseModel) -> dict[str, Any]:
    """The config fields that change what a stage writes (see the module docstring)."""
    return json.loads(json.dumps(_effective(cfg), sort_keys=True, default=str))


def effective_hash(cfg: BaseModel) -> str:
    return hashlib.sha256(json.dumps(effective_config(cfg), sort_keys=True).encode()).hexdigest()[:12]


def marker_hash(url: str) -> str | None:
    """sha256 (12 hex) of a committed output's done marker: the identity of outputs written before content ids."""
    fs, path = filesystem(url + ".done")
    try:
        return hashlib.sha256(fs.cat_file(path)).hexdigest()[:12]
    except FileNotFoundError:
        return None


def _stamp(info: dict[str, Any]) -> str:
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{stamp}".strip('"')


def source_identity(url: str) -> str:
    """Size plus mtime or etag of a source file: enough to notice it was replaced or grew. A folder (an ImageNet
    class folder) is identified by the names, sizes and stamps of every file in it, so replacing one image counts."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
        if info.get("type") != "directory":
            return _stamp(info)
        files = fs.find(path, detail=True)
    except (FileNotFoundError, OSError):
        return "missing"
    listing = sorted((name[len(path):], _stamp(i)) for name, i in files.items())
    return f"dir:{len(listing)}:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def committed_identity(url: str) -> str | None:
    """The content identity of a committed output (None when it is not committed)."""
    record = read_done(url)
    if record is None:
        return None
    return record.get("content_id") or marker_hash(url)


def content_id(output_url: str, lineage_record: dict[str, Any]) -> str:
    """Identity of a committed output: its bytes (the parquet file) together with what it was made from."""
    fs, path = filesystem(output_url)
    digest = hashlib.sha256(json.dumps(lineage_record, sort_keys=True).encode())
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def lineage(inputs: list[str], cfg: BaseModel | dict[str, Any] | str, models: dict[str, str] | None = None,
            committed_inputs: bool = True, extra_inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """The lineage record of an output made from `inputs` (committed outputs, or raw source files with
    `committed_inputs=False`) with `cfg` (a config, the dict of the settings that matter, or an already computed
    hash) and `models`.
    `extra_inputs` adds named inputs whose identity the caller computed (e.g. one shard's duplicate keys)."""
    ident = committed_identity if committed_inputs else source_identity
    entries = [{"url": u, "id": ident(u)} for u in inputs]
    entries += [{"url": name, "id": value} for name, value in sorted((extra_inputs or {}).items())]
    record: dict[str, Any] = {"inputs": entries, "models": dict(models or {})}
    if models:
        ids = {k: model_identity(v) for k, v in sorted(models.items())}
        record["model_ids"] = {k: v for k, v in ids.items() if v}
    if isinstance(cfg, str):
        record["config"] = cfg
    else:
        settings = effective_config(cfg) if isinstance(cfg, BaseModel) else json.loads(json.dumps(cfg, default=str))
        record["settings"] = settings
        record["config"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return record


def stale_reason(marker: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """Why a committed output (its marker) was not made from `wanted` lineage; None when it was."""
    have = marker.get("lineage") or {}
    if not have or "config" not in have:
        return "it was written without lineage (by an older version)"
    old, new = have.get("inputs", []), wanted["inputs"]
    if len(old) != len(new):
        return f"its inputs changed ({len(old)} then, {len(new)} now)"
    for was, entry in zip(old, new, strict=True):  # by content: a root moved or copied elsewhere stays current
        if was["id"] != entry["id"]:
            return f"input {entry['url']} changed"
    if have.get("models") != wanted.get("models"):
        changed = sorted(k for k in set(have.get("models", {})) | set(wanted.get("models", {}))
                         if have.get("models", {}).get(k) != wanted.get("models", {}).get(k))
        return "model " + ", ".join(f"{k} {have.get('models', {}).get(k)!r} -> {wanted['models'].get(k)!r}"
                                    for k in changed) + " changed"
    had, now = have.get("model_ids") or {}, wanted.get("model_ids") or {}  # absent: older marker or uncached id
    if changed := sorted(k for k in set(had) & set(now) if had[k] != now[k]):
        return "model " + ", ".join(f"{k} {wanted['models'].get(k)!r}" for k in changed) + " changed (same name, " \
               "other files)"
    if have.get("config") != wanted.get("config"):
        keys = _changed_keys(have.get("settings") or {}, wanted.get("settings") or {})
        return f"config {', '.join(keys[:4])} changed" if keys else "its config changed"
    return None


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix + k)
    return out

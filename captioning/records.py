"""Caption rows, their parquet schema, and the identity of a caption set.

Paths come from `storage.layout`: `<root>/captions/<dataset>/<caption_set>/<shard>.parquet` (+ .done), one row
per manifest key, and `caption_set.yaml` beside them, recording what defines the set (model, prompt, ...).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import yaml

from captioning.config import CaptionConfig
from storage.commit import write_atomic
from storage.errors import ConfigError
from storage.layout import caption_set_record_url
from storage.urls import filesystem

CAPTION_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),  # cleaned LLaVA caption
    ("text", pa.string()),  # the text training uses (see CaptionConfig.training_text)
    ("model_id", pa.string()),
    ("prompt", pa.string()),
    ("prompt_hash", pa.string()),
    ("generation", pa.string()),  # JSON of the generate() arguments
    ("n_tokens", pa.int32()),  # generated tokens
    ("t5_tokens", pa.int32()),  # T5 tokens of `text`, EOS included
    ("t5_truncated", pa.bool_()),  # t5_tokens > max_tokens: cut at training time
    ("finish_reason", pa.string()),  # stop | length
    ("degenerate", pa.string()),  # empty | repetition | truncated | null
    ("seconds", pa.float64()),  # generate() time per image (batch time / batch size)
    ("source_prompt", pa.string()),  # JourneyDB Midjourney prompt without parameters
    ("source_prompt_raw", pa.string()),
    ("source_caption", pa.string()),  # JourneyDB Task2.Caption
    ("status", pa.string()),  # ok | error
    ("error", pa.string()),
])


def ensure_caption_set(cfg: CaptionConfig) -> str:
    """Record what defines the set in `caption_set.yaml`; refuse to mix another combination into a named set."""
    name = cfg.resolved_caption_set()
    url = caption_set_record_url(cfg.output_root, cfg.dataset, name)
    fs, path = filesystem(url)
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            existing = yaml.safe_load(f.read()) or {}
        if existing.get("identity") != json.loads(json.dumps(cfg.identity())):
            raise ConfigError(f"caption set {name!r} was made with other settings ({url}); choose another "
                              f"caption_set name, or leave it unset to derive one from the settings")
    else:
        write_atomic(url, yaml.safe_dump({"caption_set": name, "identity": cfg.identity()}, sort_keys=False).encode())
    return name


def _base(manifest_row: dict[str, Any], cfg: CaptionConfig) -> dict[str, Any]:
    return {"key": manifest_row["key"], "model_id": cfg.model, "prompt": cfg.prompt, "prompt_hash": cfg.prompt_hash(),
            "generation": json.dumps(cfg.generation.model_dump(), sort_keys=True),
            "source_prompt": manifest_row.get("prompt"), "source_prompt_raw": manifest_row.get("prompt_raw"),
            "source_caption": manifest_row.get("caption")}


def error_row(manifest_row: dict[str, Any], cfg: CaptionConfig, error: str) -> dict[str, Any]:
    return {**_base(manifest_row, cfg), "status": "error", "error": error}


def caption_row(manifest_row: dict[str, Any], cfg: CaptionConfig, *, caption: str, n_tokens: int,
                finish_reason: str, degenerate: str | None, seconds: float) -> dict[str, Any]:
    """A caption row without T5 counts (filled per batch by `add_t5_counts`)."""
    choices = {"llava": caption, "prompt": manifest_row.get("prompt"), "caption": manifest_row.get("caption")}
    text = choices[cfg.training_text] or caption  # JourneyDB fields can be empty: fall back to LLaVA's caption
    return {**_base(manifest_row, cfg), "caption": caption, "text": text, "n_tokens": n_tokens,
            "finish_reason": finish_reason, "degenerate": degenerate, "seconds": seconds, "status": "ok",
            "error": None}


def add_t5_counts(rows: list[dict[str, Any]], counter, max_tokens: int) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    for row, n in zip(ok, counter([r["text"] for r in ok]), strict=True):
        row["t5_tokens"] = n
        row["t5_truncated"] = n > max_tokens

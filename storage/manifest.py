"""Parquet manifests: one row per sample of a source shard, at `<root>/manifests/<dataset>/<shard>.parquet`.

A manifest is complete only when its done marker exists (see `storage.commit`). Error rows carry `status="error"`
and a one-line `error`; good rows have `status="ok"` and width/height after EXIF orientation.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from storage.commit import is_done
from storage.layout import manifest_dir, manifest_url
from storage.parquet import read_table, write_table
from storage.urls import filesystem, to_url

__all__ = ["MANIFEST_SCHEMA", "STATUS_ERROR", "STATUS_OK", "committed_manifests", "manifest_dir", "manifest_url",
           "read_dataset", "read_manifest", "write_manifest"]

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # sample id, unique per dataset; no dots or slashes
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("source_url", pa.string(), nullable=False),  # the archive (or class folder) holding the image
        pa.field("member", pa.string()),  # member name inside the archive ('' for shard-level errors)
        pa.field("offset", pa.int64()),  # byte offset of the member's data in an uncompressed tar
        pa.field("width", pa.int32()),  # after EXIF orientation
        pa.field("height", pa.int32()),
        pa.field("bytes", pa.int64()),
        pa.field("sha256", pa.string()),  # only with hash=sha256
        pa.field("hash", pa.string()),  # "<algorithm>:<hex>" of the image bytes (storage/hashing.py)
        pa.field("format", pa.string()),
        pa.field("label", pa.int32()),  # ImageNet class index 0..999
        pa.field("wnid", pa.string()),
        pa.field("prompt", pa.string()),  # JourneyDB prompt without Midjourney parameters
        pa.field("prompt_raw", pa.string()),
        pa.field("caption", pa.string()),  # JourneyDB Task2.Caption, when present
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),
    ]
)

STATUS_OK = "ok"
STATUS_ERROR = "error"


def write_manifest(rows: list[dict[str, Any]], url: str) -> None:
    write_table(rows, url, MANIFEST_SCHEMA)


def read_manifest(url: str, columns: list[str] | None = None) -> pa.Table:
    return read_table(url, columns)


def committed_manifests(root: str, dataset: str) -> list[str]:
    """URLs of the manifests whose done marker exists, in shard order."""
    fs, path = filesystem(manifest_dir(root, dataset))
    if not fs.exists(path):
        return []
    urls = [to_url(fs, p) for p in sorted(fs.glob(f"{path}/*.parquet"))]
    return [u for u in urls if is_done(u)]


def read_dataset(root: str, dataset: str) -> pa.Table:
    """All committed manifests of a dataset as one table."""
    tables = [read_manifest(u) for u in committed_manifests(root, dataset)]
    return pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()


def _reason(error: str) -> str:
    """An error message with its particulars (quoted names, paths, numbers) blanked, so that rows group by cause."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", error)
    text = re.sub(r"(?:[a-z]+://|/)[^\s:,;)]+", "<path>", text)
    return re.sub(r"\d+", "N", text).strip()


def error_reasons(urls: list[str], most: int = 10) -> list[dict[str, Any]]:
    """Error rows of committed outputs (manifests, caption shards, feature indexes) by reason, most frequent first:
    [{"reason", "rows", "example": "<shard>/<key>: <error>"}]."""
    counts: dict[str, dict[str, Any]] = {}
    for url in urls:
        t = read_table(url, ["key", "status", "error"])
        for key, status, error in zip(t["key"].to_pylist(), t["status"].to_pylist(), t["error"].to_pylist(),
                                      strict=True):
            if status == STATUS_ERROR:
                reason = _reason(error or "no reason given")
                entry = counts.setdefault(reason, {"reason": reason, "rows": 0,
                                                   "example": f"{url.rsplit('/', 1)[-1]}/{key}: {error}"})
                entry["rows"] += 1
    return sorted(counts.values(), key=lambda e: (-e["rows"], e["reason"]))[:most]

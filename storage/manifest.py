"""Parquet manifests: one row per sample of a source shard, at `<root>/manifests/<dataset>/<shard>.parquet`.

A manifest is complete only when its done marker exists (see `storage.commit`). Error rows carry `status="error"`
and a one-line `error`; good rows have `status="ok"` and width/height after EXIF orientation.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.commit import is_done
from storage.urls import filesystem, join, to_url

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
        pa.field("sha256", pa.string()),
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


def manifest_dir(root: str, dataset: str) -> str:
    return join(root, "manifests", dataset)


def manifest_url(root: str, dataset: str, shard: str) -> str:
    return join(manifest_dir(root, dataset), f"{shard}.parquet")


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def write_manifest(rows: list[dict[str, Any]], url: str) -> None:
    fs, path = filesystem(url)
    with fs.open(path, "wb") as f:
        pq.write_table(rows_to_table(rows), f, compression="zstd")


def read_manifest(url: str) -> pa.Table:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


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

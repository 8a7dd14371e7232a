"""Parquet reading and writing for every stage, local or on an object store, in one place.

Local files are read by path through pyarrow's own filesystem. Remote files are fetched whole into memory (shard
tables are small: one row per sample) and parsed from a buffer. Handing pyarrow an fsspec file object instead lets
its reader threads call back into Python, which aborted the interpreter at exit ("terminate called without an
active exception") in most runs of `pixart audit`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import PipelineError
from storage.urls import filesystem, protocol_of

Row = dict[str, Any]


def read_table(url: str, columns: list[str] | None = None) -> pa.Table:
    """The table at `url`. A file that is not valid parquet (truncated, overwritten, a missing column) is a
    permanent PipelineError naming it: pyarrow reports corrupt pages as an errno-less OSError, which would otherwise
    read as a transient I/O error and be retried. Real I/O errors (with an errno, or from the object store's fetch)
    stay OSErrors, so that transient ones are retried."""
    fs, path = filesystem(url)
    try:
        if protocol_of(fs) in ("file", "local"):
            return pq.read_table(path, columns=columns)
        blob = fs.cat_file(path)
        return pq.read_table(pa.BufferReader(blob), columns=columns)
    except (pa.ArrowException, OSError) as e:  # pa.ArrowIOError *is* OSError
        if isinstance(e, OSError) and (e.errno is not None or isinstance(e, FileNotFoundError)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise PipelineError(f"{url}: not a readable parquet table ({first})") from None


def read_rows(url: str, columns: list[str] | None = None) -> list[Row]:
    return read_table(url, columns).to_pylist()


def to_table(rows: Iterable[Row] | pa.Table, schema: pa.Schema | None = None) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows if schema is None else rows.cast(schema)
    rows = list(rows)
    return pa.Table.from_pylist(rows, schema=schema) if schema is not None or rows else pa.table({})


def write_table(rows: Iterable[Row] | pa.Table, url: str, schema: pa.Schema | None = None) -> None:
    """Write rows (or a table) to `url` as zstd parquet. Callers publish atomically (`storage.commit`)."""
    table = to_table(rows, schema)
    fs, path = filesystem(url)
    if protocol_of(fs) in ("file", "local"):
        fs.makedirs(fs._parent(path), exist_ok=True)
        pq.write_table(table, path, compression="zstd")
        return
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    fs.pipe_file(path, sink.getvalue().to_pybytes())

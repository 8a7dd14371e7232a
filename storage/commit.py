"""Atomic per-shard commits: write under a temporary name, publish, then write the done marker last.

    with commit_shard(out_url) as tmp_url:      # write the shard to tmp_url
        write_manifest(rows, tmp_url)
    write_done(out_url, result)                 # marker last: only now does the shard count as done

A reader trusts a shard only when its marker exists (`is_done`), so a crash at any point leaves either nothing or
a complete shard. A re-run skips shards whose marker exists unless forced. On local disks publishing is a rename;
on object stores it is a copy that becomes visible all at once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from storage.urls import filesystem, protocol_of, to_url

DONE_SUFFIX = ".done"
TMP_MARK = ".tmp-"


def done_url(out_url: str) -> str:
    """The marker that says `out_url` is complete."""
    return out_url + DONE_SUFFIX


def is_done(out_url: str) -> bool:
    fs, path = filesystem(done_url(out_url))
    return fs.exists(path)


def read_done(out_url: str) -> dict[str, Any] | None:
    """The result record stored in the marker, or None when the shard is not committed."""
    fs, path = filesystem(done_url(out_url))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def _unmark(fs, path: str) -> str:
    """Before (re)writing `path`: drop its marker and the leftovers of crashed attempts; return a fresh temp path."""
    marker = path + DONE_SUFFIX
    if fs.exists(marker):
        fs.rm(marker)  # a shard being replaced must never look done
    for stale in fs.glob(path + TMP_MARK + "*"):
        fs.rm(stale, recursive=True)
    return f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"


def _publish(fs, tmp: str, final: str) -> None:
    if protocol_of(fs) in ("file", "local"):
        fs.mv(tmp, final)  # os.replace: atomic on one filesystem
    else:
        fs.copy(tmp, final)  # object stores: the final key appears complete or not at all
        fs.rm(tmp)


@contextmanager
def commit_shard(out_url: str) -> Iterator[str]:
    """Yield a temporary URL to write to; publish it as `out_url` when the block exits cleanly.

    An existing marker is removed first, so an overwritten shard is never marked done while it is being replaced.
    On error the temporary file is deleted and nothing is published.
    """
    fs, path = filesystem(out_url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    tmp = _unmark(fs, path)
    try:
        yield to_url(fs, tmp)
        _publish(fs, tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


@contextmanager
def commit_dir(out_url: str) -> Iterator[tuple[object, str]]:
    """Like `commit_shard` for a directory: yields (filesystem, temporary path); replaces `out_url` on success."""
    fs, path = filesystem(out_url)
    tmp = _unmark(fs, path)
    fs.makedirs(tmp, exist_ok=True)
    try:
        yield fs, tmp
        if fs.exists(path):
            fs.rm(path, recursive=True)
        if protocol_of(fs) in ("file", "local"):
            fs.mv(tmp, path, recursive=True)  # one rename
        else:  # object stores have no directories: copy object by object, then drop the temporary prefix
            for src in fs.find(tmp):
                fs.copy(src, path + src[len(tmp):])
            fs.rm(tmp, recursive=True)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        raise


def write_done(out_url: str, record: dict[str, Any]) -> None:
    """Write the marker (a JSON result record) last, itself atomically."""
    fs, path = filesystem(out_url)
    marker = path + DONE_SUFFIX
    tmp = f"{marker}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(record, indent=1, sort_keys=True, default=str).encode())
    _publish(fs, tmp, marker)


def write_atomic(url: str, data: bytes) -> None:
    """Write a small file (a config, a report) atomically."""
    fs, path = filesystem(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    _publish(fs, tmp, path)

"""Atomic per-shard commits: write under a temporary name, publish, then write the done marker last.

    with commit_shard(out_url) as tmp_url:      # write the shard to tmp_url
        write_table(rows, tmp_url)
    write_done(out_url, result)                 # marker last: only now does the shard count as done

A reader trusts a shard only when its marker exists (`is_done`), so a crash at any point leaves either nothing or
a complete shard. A re-run skips shards whose marker exists unless forced. On local disks publishing is a rename;
on object stores it is a copy that becomes visible all at once.
"""

from __future__ import annotations

import errno
import json
import os
import time
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


STALE_TMP_SECONDS = 3600  # a temporary older than this belongs to a crashed writer (a live one finishes in minutes)


def _tmp_name(path: str) -> str:
    return f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"


def sweep_stale(fs, path: str, max_age: float | None = None) -> int:
    """Delete `<path>.tmp-*` and `<path>.done.tmp-*` left by crashed writers (disk full, kill -9).

    Only temporaries older than `max_age` go: a younger one may belong to another run writing right now, and
    deleting it under that run's feet is how two concurrent ingests once lost a whole shard.
    """
    removed = 0
    now = time.time()
    max_age = STALE_TMP_SECONDS if max_age is None else max_age
    for stale in fs.glob(path + TMP_MARK + "*") + fs.glob(path + DONE_SUFFIX + TMP_MARK + "*"):
        try:
            modified = fs.modified(stale).timestamp()
        except (FileNotFoundError, NotImplementedError, OSError):
            continue
        if now - modified > max_age:
            fs.rm(stale, recursive=True)
            removed += 1
    return removed


def _unmark(fs, path: str) -> str:
    """Before (re)writing `path`: drop its marker and old leftovers of crashed attempts; return a fresh temp path."""
    marker = path + DONE_SUFFIX
    if fs.exists(marker):
        fs.rm(marker)  # a shard being replaced must never look done
    sweep_stale(fs, path)
    return _tmp_name(path)


def _discard(fs, tmp: str) -> None:
    try:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
    except OSError:
        pass


def _publish(fs, tmp: str, final: str) -> None:
    if protocol_of(fs) in ("file", "local"):
        os.replace(tmp, final)  # atomic on one filesystem
    else:
        fs.copy(tmp, final)  # object stores: the final key appears complete or not at all
        fs.rm(tmp)


@contextmanager
def commit_shard(out_url: str) -> Iterator[str]:
    """Yield a temporary URL to write to; publish it as `out_url` when the block exits cleanly.

    An existing marker is removed first, so an overwritten shard is never marked done while it is being replaced.
    On error the temporary file is deleted and nothing is published. Two writers of the same shard each publish a
    complete file; the last one wins.
    """
    fs, path = filesystem(out_url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    tmp = _unmark(fs, path)
    try:
        yield to_url(fs, tmp)
        _publish(fs, tmp, path)
    except BaseException:
        _discard(fs, tmp)
        raise


@contextmanager
def publish_dir_once(out_url: str, replace_unmarked: bool = False) -> Iterator[tuple[object, str]]:
    """Write a directory under a temporary name and publish it as `out_url`, unless it is already published.

    For immutable, content-addressed directories (a JourneyDB annotation index keyed by the file's identity): a
    published directory is never replaced or deleted, so a reader never sees it half-gone. When two runs build the
    same directory at once, the first to publish wins and the other drops its copy. Yields (filesystem, tmp path);
    check `is_done(out_url)` first to skip the work.

    `replace_unmarked`: a directory already at `out_url` counts only with its done marker; one without (left by a
    writer killed between publishing and marking, whose content may be another run's) is replaced by this one
    instead of kept. For outputs whose name is not their content (a training checkpoint `step-N`).
    """
    fs, path = filesystem(out_url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    sweep_stale(fs, path)
    tmp = _tmp_name(path)
    fs.makedirs(tmp, exist_ok=True)
    try:
        yield fs, tmp
        if protocol_of(fs) in ("file", "local"):
            try:
                os.rename(tmp, path)  # fails if another run published first: keep theirs
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                    raise
                if replace_unmarked and not fs.exists(path + DONE_SUFFIX):
                    aside = _tmp_name(path)  # out of the way in one rename, then ours in: never a mix of both
                    os.rename(path, aside)
                    os.rename(tmp, path)
                    _discard(fs, aside)
                else:
                    _discard(fs, tmp)
        elif not fs.exists(path + DONE_SUFFIX):  # object stores: the marker, written after this, is what counts
            if replace_unmarked and fs.exists(path):
                fs.rm(path, recursive=True)  # an unmarked leftover: none of its files may stay beside ours
            for src in fs.find(tmp):
                fs.copy(src, path + src[len(tmp):])
            fs.rm(tmp, recursive=True)
        else:
            _discard(fs, tmp)
    except BaseException:
        _discard(fs, tmp)
        raise


def write_done(out_url: str, record: dict[str, Any]) -> None:
    """Write the marker (a JSON result record) last, itself atomically."""
    fs, path = filesystem(out_url)
    marker = path + DONE_SUFFIX
    sweep_stale(fs, marker)
    _write_then_publish(fs, marker, json.dumps(record, indent=1, sort_keys=True, default=str).encode())


def write_atomic(url: str, data: bytes) -> None:
    """Write a small file (a config, a report) atomically."""
    fs, path = filesystem(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    sweep_stale(fs, path)  # e.g. quality.json.tmp-* left by a run that hit a full disk
    _write_then_publish(fs, path, data)


def _write_then_publish(fs, path: str, data: bytes) -> None:
    """A full disk or a failed upload leaves nothing behind: the temporary is removed on any error."""
    tmp = _tmp_name(path)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        _publish(fs, tmp, path)
    except BaseException:
        _discard(fs, tmp)
        raise

"""Read back the image bytes that committed manifest rows point at.

    for row, data, error in iter_manifest_images(rows):   # rows: manifest dicts (key, source_url, member, ...)
        ...

Rows are grouped by source archive and each archive is opened once. Plain tars on seekable storage are read by
range (`offset`, `bytes`), so a resumed shard reads only what it still needs; compressed archives are streamed.
Bytes are checked against the manifest's content hash, so a source that changed since ingest becomes an error, not a
silently different sample. Never raises for a single sample; raises SourceError when a source cannot be opened.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from storage.hashing import matches
from storage.parquet import Row
from storage.tarstream import SEEKABLE_PROTOCOLS, iter_tar
from storage.urls import filesystem, join, open_url, protocol_of

_ARCHIVE_SUFFIXES = (".tar", ".tgz", ".tar.gz")


def _checked(row: Row, data: bytes) -> tuple[Row, bytes | None, str | None]:
    expected = row.get("hash") or row.get("sha256")
    if expected and not matches(data, expected):
        return row, None, "source bytes changed since ingest (hash mismatch)"
    return row, data, None


def _by_range(url: str, rows: list[Row]) -> Iterator[tuple[Row, bytes | None, str | None]]:
    with open_url(url, "rb") as f:
        for row in sorted(rows, key=lambda r: r["offset"]):
            f.seek(row["offset"])
            data = f.read(row["bytes"])
            if len(data) != row["bytes"]:
                yield row, None, "source archive is shorter than at ingest"
            else:
                yield _checked(row, data)


def _by_stream(url: str, rows: list[Row]) -> Iterator[tuple[Row, bytes | None, str | None]]:
    wanted = {r["member"]: r for r in rows}
    for entry in iter_tar(url):
        row = wanted.pop(entry.name, None)
        if row is None:
            continue
        if entry.data is None:
            yield row, None, entry.error or "member unreadable"
        else:
            yield _checked(row, entry.data)
        if not wanted:
            return
    for row in wanted.values():
        yield row, None, "member not found in the source archive"


def _from_folder(url: str, rows: list[Row]) -> Iterator[tuple[Row, bytes | None, str | None]]:
    fs, path = filesystem(url)
    for row in rows:
        try:
            yield _checked(row, fs.cat_file(join(path, row["member"])))
        except FileNotFoundError:
            yield row, None, "file not found in the source folder"


def iter_manifest_images(rows: Iterable[Row]) -> Iterator[tuple[Row, bytes | None, str | None]]:
    """(row, bytes, None) or (row, None, reason) for every row, grouped by source (order within one may vary)."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row["source_url"], []).append(row)
    for url, group in groups.items():
        base = url.split("?", 1)[0]
        if not base.endswith(_ARCHIVE_SUFFIXES):
            yield from _from_folder(url, group)
        elif (base.endswith(".tar") and protocol_of(filesystem(url)[0]) in SEEKABLE_PROTOCOLS
              and all(r.get("offset") is not None and r.get("bytes") is not None for r in group)):
            yield from _by_range(url, group)
        else:
            yield from _by_stream(url, group)

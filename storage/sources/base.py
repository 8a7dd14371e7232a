"""What every source reader yields, and how shards are found under a directory, glob or single URL."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from storage.errors import SourceError
from storage.urls import basename, describe_error, filesystem, to_url

_SHARD_NAME = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class SourceShard:
    """One unit of ingest work: a tar/tgz archive or (ImageNet) one class folder."""

    name: str  # safe file stem for outputs: [A-Za-z0-9_-]
    url: str
    kind: str = "tar"  # "tar" | "folder"


@dataclass
class SourceSample:
    """One sample, or one error row when `error` is set (then `data` may be None)."""

    key: str
    member: str = ""
    data: bytes | None = None
    offset: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # label, wnid, prompt, prompt_raw, caption, json_w/h
    error: str | None = None


def safe_name(text: str) -> str:
    """A string usable as a file stem and a webdataset key (no dots, no slashes)."""
    name = _SHARD_NAME.sub("_", text).strip("_")
    return name or "unnamed"


def shard_name_of(url: str) -> str:
    stem = basename(url)
    for ext in (".tar.gz", ".tgz", ".tar"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return safe_name(stem)


def list_archives(source: str, patterns: tuple[str, ...], what: str) -> list[str]:
    """Archive URLs under a directory (matching `patterns`), from a glob, or a single archive URL."""
    fs, path = filesystem(source)
    try:
        if any(ch in path for ch in "*?["):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = sorted({p for pat in patterns for p in fs.glob(f"{path.rstrip('/')}/{pat}")})
        elif fs.exists(path):
            found = [path]
        else:
            raise SourceError(f"{source}: does not exist")
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - backend errors (auth, network) become one clear line
        raise SourceError(describe_error(source, e)) from None
    if not found:
        raise SourceError(f"{source}: no {what} found (looked for {', '.join(patterns)})")
    return [to_url(fs, p) for p in sorted(found)]

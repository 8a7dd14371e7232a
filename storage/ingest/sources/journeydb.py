"""JourneyDB reader: `imgs/NNN.tgz` archives (members `NNN/<id>.jpg`) joined to the annotation jsonl.

The annotation file (`*_anno_repath.jsonl`, optionally `.tgz`/`.gz`) is global. `JourneyDB.prepare` streams it
once into a parquet index partitioned by folder `NNN` (keyed by image stem), named by the file's content identity;
each shard then loads only its own folder's rows. Records are
matched by folder plus stem, so `.png`/`.jpg` naming differences do not matter. `Task2.Caption` may be missing or
null. Midjourney parameters (`--ar 16:9`, `--v 5`, ...) are stripped from the prompt; the raw prompt is kept.

A bad annotation line is counted as malformed and the rest is indexed: a line over `DEFAULT_MAX_LINE_BYTES`
(1 MiB, about 500x a real record; it is read in chunks and dropped, never held whole), JSON nested past the
parser's recursion limit, or text holding a lone surrogate (which parquet cannot store).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
from pyarrow.fs import FSSpecHandler, PyFileSystem

from storage.commit import publish_dir_once, read_done, write_done
from storage.errors import SourceError
from storage.ingest.sources.base import Source, SourceSample, SourceShard, list_archives, register
from storage.layout import index_dir, safe_name, shard_name_of
from storage.lineage import source_identity
from storage.parquet import read_rows
from storage.tarstream import iter_tar, member_stem, normalize_member_name
from storage.urls import filesystem, open_url, to_url

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
# Midjourney parameters go at the end of a prompt; some clients turn "--" into an em dash.
_FLAGS = re.compile(r"(?:^|\s)(?:--|\u2014)[a-zA-Z].*$", re.DOTALL)
_IMAGE_URLS = re.compile(r"<?https?://\S+>?")
_SPACES = re.compile(r"\s+")


def strip_midjourney_flags(prompt: str) -> str:
    """'a cat, oil painting --ar 16:9 --v 5' -> 'a cat, oil painting'. Also drops image-prompt URLs."""
    text = _FLAGS.sub("", prompt)
    text = _IMAGE_URLS.sub(" ", text)
    return _SPACES.sub(" ", text).strip(" ,")


def list_shards(source: str) -> list[SourceShard]:
    urls = list_archives(source, ("*.tgz", "imgs/*.tgz", "*.tar.gz", "imgs/*.tar.gz"), "JourneyDB image archives")
    return [SourceShard(name=shard_name_of(u), url=u) for u in urls]


# ---------------------------------------------------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------------------------------------------------


DEFAULT_MAX_LINE_BYTES = 1 << 20
_READ_CHUNK = 1 << 20


def _bounded_lines(stream: Any, limit: int) -> Iterator[bytes | int]:
    """Lines of a binary stream, without their newline, read in 1 MiB chunks. A line over `limit` bytes comes out
    as its length (an int) instead: its bytes are dropped as they arrive, so memory stays within limit + a chunk."""
    tail, skipped = b"", 0  # skipped > 0: inside an over-long line, of which that many bytes were dropped
    while chunk := stream.read(_READ_CHUNK):
        *lines, tail = (tail + chunk).split(b"\n")
        for line in lines:
            if skipped or len(line) > limit:
                yield skipped + len(line)
                skipped = 0
            else:
                yield line
        if skipped or len(tail) > limit:
            skipped, tail = skipped + len(tail), b""
    if skipped or len(tail) > limit:
        yield skipped + len(tail)
    elif tail:
        yield tail


def _jsonl_lines(url: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[bytes | int]:
    """Lines of a .jsonl, .jsonl.gz, or a .tgz/.tar.gz holding one .jsonl; an int for a line over the limit."""
    with open_url(url, "rb") as raw:
        if url.endswith((".tgz", ".tar.gz")):
            try:
                with tarfile.open(fileobj=raw, mode="r|gz") as tf:
                    for info in tf:
                        if info.isreg() and info.name.endswith(".jsonl"):
                            yield from _bounded_lines(tf.extractfile(info), max_line_bytes)
                            return
            except (tarfile.TarError, EOFError, OSError) as e:
                raise SourceError(f"{url}: annotation archive unreadable: {e}") from None
            raise SourceError(f"{url}: annotation archive holds no .jsonl file")
        stream = gzip.GzipFile(fileobj=raw) if url.endswith(".gz") else raw
        try:
            yield from _bounded_lines(stream, max_line_bytes)
        except (EOFError, OSError) as e:
            raise SourceError(f"{url}: annotation file unreadable: {e}") from None


def parse_record(line: bytes) -> dict[str, Any]:
    """One jsonl line -> annotation fields; raises ValueError with a reason for malformed records."""
    try:
        doc = json.loads(line)
    except RecursionError:  # the parser recurses once per nesting level
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise ValueError("record is not a JSON object")
    img_path = doc.get("img_path")
    if not isinstance(img_path, str) or not img_path.strip():
        raise ValueError("record has no img_path")
    rel, _ = normalize_member_name(img_path.strip())
    folder = safe_name(posixpath.dirname(rel))  # matches the shard name of NNN.tgz
    stem, _ = member_stem(posixpath.basename(rel))
    prompt_raw = doc.get("prompt")
    task2 = doc.get("Task2")
    caption = task2.get("Caption") if isinstance(task2, dict) else None
    rec = {
        "folder": folder,
        "key": safe_name(stem),
        "img_path": img_path,
        "prompt_raw": prompt_raw if isinstance(prompt_raw, str) else None,
        "prompt": strip_midjourney_flags(prompt_raw) if isinstance(prompt_raw, str) else None,
        "caption": caption if isinstance(caption, str) and caption.strip() else None,
    }
    for name in ("img_path", "prompt_raw", "caption"):
        if rec[name] is not None and not _is_unicode(rec[name]):
            raise ValueError(f"{name} holds a lone surrogate (not valid Unicode)")
    return rec


def _is_unicode(text: str) -> bool:
    """False for a lone surrogate (from a JSON escape like \\ud800, or UTF-8 encoded): parquet refuses those."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def iter_annotations(url: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[dict[str, Any]]:
    """Every record, or {"line": N, "error": reason} for a malformed line (one over `max_line_bytes` included)."""
    for line_no, line in enumerate(_jsonl_lines(url, max_line_bytes), start=1):
        if isinstance(line, int):
            yield {"line": line_no, "error": f"malformed annotation line {line_no}: line of {line} bytes is over the "
                   f"limit of {max_line_bytes}"}
            continue
        if not line.strip():
            continue
        try:
            rec = parse_record(line)
        except (ValueError, TypeError, AttributeError) as e:
            yield {"line": line_no, "error": f"malformed annotation line {line_no}: {e}"}
            continue
        rec["line"] = line_no
        yield rec


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


def iter_samples(shard: SourceShard, records: list[dict[str, Any]]) -> Iterator[SourceSample]:
    """Join the images of one archive to that folder's annotation records."""
    by_key = {r["key"]: r for r in records}
    seen: set[str] = set()
    missing = "annotation record without its image"
    for entry in iter_tar(shard.url):
        if entry.truncated:
            yield SourceSample(key=shard.name, error=entry.error)
            missing = f"image not reached: {entry.error}"
            break
        stem, ext = member_stem(entry.name)
        key = safe_name(stem.rsplit("/", 1)[-1])
        if entry.error:  # an unreadable image of a known key: its row is this error, not a second "missing" row
            seen.add(key)
            yield SourceSample(key=key, member=entry.name, error=entry.error)
            continue
        if ext not in IMAGE_EXTS:
            yield SourceSample(key=key, member=entry.name, error=f"unexpected member {entry.name!r}")
            continue
        if key in seen:
            yield SourceSample(key=key, member=entry.name, error=f"duplicate image for key {key!r}")
            continue
        seen.add(key)
        rec = by_key.get(key)
        if rec is None:
            yield SourceSample(key=key, member=entry.name, error="image without an annotation record")
            continue
        fields = {k: rec[k] for k in ("prompt", "prompt_raw", "caption")}
        yield SourceSample(key=key, member=entry.name, data=entry.data, offset=entry.offset, fields=fields)
    for key, rec in by_key.items():
        if key not in seen:
            yield SourceSample(key=key, member=rec["img_path"], error=missing)


# ---------------------------------------------------------------------------------------------------------------------
# The source: a folder-partitioned annotation index, built once per annotation file content
# ---------------------------------------------------------------------------------------------------------------------

_INDEX_SCHEMA = pa.schema([("folder", pa.string()), ("key", pa.string()), ("img_path", pa.string()),
                           ("prompt", pa.string()), ("prompt_raw", pa.string()), ("caption", pa.string()),
                           ("line", pa.int64())])
_INDEX_BATCH = 50_000
_INDEX_BATCH_BYTES = 64 << 20  # flush early when records are long, so memory stays bounded
MAX_REPORTED_ERRORS = 100


def index_url(cfg) -> str:
    """`<root>/manifests/journeydb/_index/annotations-<id>/folder=NNN/*.parquet` (+ `.done`), where <id> hashes
    the annotation file's URL, size and mtime/etag: a replaced or grown file gets a new index, never a stale one."""
    ident = f"{cfg.annotations}|{source_identity(cfg.annotations)}"
    return index_dir(cfg.output_root, cfg.dataset, "annotations", hashlib.sha256(ident.encode()).hexdigest()[:12])


def build_index(annotations: str, url: str) -> dict[str, Any]:
    """Stream the annotation jsonl (4M+ lines) once into a folder-partitioned parquet dataset; memory stays
    bounded by one batch. Published once and never replaced, so concurrent runs never read a half-built index."""
    counts, errors, size = {"records": 0, "errors": 0}, [], {"bytes": 0}

    def batches() -> Iterator[pa.RecordBatch]:
        buffer = []
        for rec in iter_annotations(annotations):
            if "error" in rec:
                counts["errors"] += 1
                if len(errors) < MAX_REPORTED_ERRORS:
                    errors.append(rec["error"])
                continue
            counts["records"] += 1
            buffer.append(rec)
            size["bytes"] += sum(len(v) for v in rec.values() if isinstance(v, str))
            if len(buffer) == _INDEX_BATCH or size["bytes"] > _INDEX_BATCH_BYTES:  # records may be up to 1 MiB
                yield pa.RecordBatch.from_pylist(buffer, schema=_INDEX_SCHEMA)
                buffer, size["bytes"] = [], 0
        if buffer:
            yield pa.RecordBatch.from_pylist(buffer, schema=_INDEX_SCHEMA)

    with publish_dir_once(url) as (fs, tmp):
        pads.write_dataset(pa.RecordBatchReader.from_batches(_INDEX_SCHEMA, batches()), tmp, format="parquet",
                           filesystem=PyFileSystem(FSSpecHandler(fs)), partitioning=["folder"],
                           partitioning_flavor="hive", max_rows_per_group=_INDEX_BATCH,
                           existing_data_behavior="overwrite_or_ignore")
    record = {"annotations": annotations, "index_url": url, "num_records": counts["records"],
              "num_error": counts["errors"], "errors": errors}
    write_done(url, record)
    return record


def folder_records(url: str, folder: str) -> list[dict[str, Any]]:
    fs, path = filesystem(url)
    rows: list[dict[str, Any]] = []
    for part in sorted(fs.glob(f"{path}/folder={folder}/*.parquet")):
        rows += read_rows(to_url(fs, part))
    return rows


@register
class JourneyDB(Source):
    name = "journeydb"
    has_prompts = True

    def check(self, cfg) -> None:
        if not cfg.annotations:
            raise ValueError("dataset journeydb needs annotations=<path to the *_anno_repath.jsonl[.tgz]>")
        if cfg.synset_mapping:
            raise ValueError("synset_mapping is only used by imagenet, not journeydb")

    def list_shards(self, cfg) -> list[SourceShard]:
        return list_shards(cfg.source)

    def prepare(self, cfg) -> dict[str, Any]:
        url = index_url(cfg)
        return read_done(url) or build_index(cfg.annotations, url)

    def iter_samples(self, shard: SourceShard, cfg, ctx) -> Iterator[SourceSample]:
        return iter_samples(shard, folder_records(ctx["index_url"], shard.name))

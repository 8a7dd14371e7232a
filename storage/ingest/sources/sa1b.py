"""SA-1B reader: `sa_NNNNNN.tar` archives holding `sa_<id>.jpg` + `sa_<id>.json` pairs.

Input is a directory of tars, a glob, a single tar, or Meta's links TSV (`file_name<TAB>cdn_link`, header row).
Only `image.{image_id,width,height,file_name}` of each JSON is used; width/height are checked against the image.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator

from storage.errors import SourceError
from storage.ingest.sources.base import Source, SourceSample, SourceShard, list_archives, register
from storage.layout import safe_name, shard_name_of
from storage.tarstream import iter_tar, member_stem
from storage.urls import read_text

IMAGE_EXTS = (".jpg", ".jpeg")


def _links(tsv_url: str) -> list[SourceShard]:
    rows = list(csv.reader(io.StringIO(read_text(tsv_url)), delimiter="\t"))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["file_name", "cdn_link"]:
        raise SourceError(f"{tsv_url}: not an SA-1B links file (expected a 'file_name<TAB>cdn_link' header)")
    shards = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or not row[1].strip():
            raise SourceError(f"{tsv_url}:{line_no}: expected 'file_name<TAB>cdn_link', got {row!r}")
        shards.append(SourceShard(name=shard_name_of(row[0].strip()), url=row[1].strip()))
    if not shards:
        raise SourceError(f"{tsv_url}: links file lists no tars")
    return shards


def list_shards(source: str) -> list[SourceShard]:
    if source.endswith((".tsv", ".txt")):
        return _links(source)
    return [SourceShard(name=shard_name_of(u), url=u) for u in list_archives(source, ("sa_*.tar",), "SA-1B tars")]


_IMAGE_KEY = re.compile(rb'"image"\s*:\s*')
_DECODER = json.JSONDecoder()


def _image_object(data: bytes, full: bool) -> dict:
    """The `image` object of an SA-1B JSON.

    A file holds up to thousands of mask RLE strings that ingest never uses, so unless `full`, only the small
    `image` object is decoded (RLE strings cannot contain '"image"': their alphabet has no quote). A document that
    does not end in '}' is reported as cut short; any doubt falls back to parsing the whole document.
    """
    if not full:
        if not data.rstrip().endswith(b"}"):
            raise ValueError("document is cut short (no closing brace)")
        m = _IMAGE_KEY.search(data)
        if m is not None:
            try:
                image, _ = _DECODER.raw_decode(data[m.end():m.end() + 4096].decode("utf-8", "replace"))
                if isinstance(image, dict):
                    return image
            except (ValueError, RecursionError):  # a 4 KB window can nest past the recursion limit too
                pass
    try:
        doc = json.loads(data)
    except RecursionError:  # the parser recurses once per nesting level: a hostile file must not fail the shard
        raise ValueError("nested too deeply") from None
    if not isinstance(doc, dict):
        raise TypeError("top level is not an object")
    return doc["image"]


def _parse_json(data: bytes, full: bool = False) -> tuple[dict | None, str | None]:
    try:
        image = _image_object(data, full)
        return {"json_width": int(image["width"]), "json_height": int(image["height"]),
                "image_id": image.get("image_id"), "file_name": image.get("file_name")}, None
    except (ValueError, TypeError, OverflowError) as e:  # OverflowError: int() of 1e999, which JSON reads as inf
        return None, f"malformed JSON: {e}"
    except KeyError as e:
        return None, f"JSON lacks image field {e}"


def _pair(key: str, image, meta, full_json: bool) -> SourceSample:
    if meta is None:
        return SourceSample(key=key, member=image.name, error="image without its JSON")
    if image is None:
        return SourceSample(key=key, member=meta.name, error="JSON without its image")
    fields, err = _parse_json(meta.data, full_json)
    return SourceSample(key=key, member=image.name, data=image.data, offset=image.offset, fields=fields or {},
                        error=err)


def iter_samples(shard: SourceShard, full_json: bool = False) -> Iterator[SourceSample]:
    """Pair `sa_<id>.jpg` with `sa_<id>.json`; `full_json` parses each JSON whole (masks included)."""
    pending: dict[str, dict] = {}
    seen: set[str] = set()
    for entry in iter_tar(shard.url, compressed=False):
        if entry.truncated:
            for key, parts in pending.items():
                yield SourceSample(key=key, member=(parts.get("img") or parts["json"]).name,
                                   error=f"sample incomplete: {entry.error}")
            yield SourceSample(key=shard.name, error=entry.error)
            return
        stem, ext = member_stem(entry.name)
        key = safe_name(stem.rsplit("/", 1)[-1])
        if entry.error:
            yield SourceSample(key=key, member=entry.name, error=entry.error)
            continue
        slot = "img" if ext in IMAGE_EXTS else "json" if ext == ".json" else None
        if slot is None:
            yield SourceSample(key=key, member=entry.name, error=f"unexpected member {entry.name!r} in SA-1B tar")
            continue
        if key in seen or slot in pending.get(key, {}):
            yield SourceSample(key=key, member=entry.name, error=f"duplicate member for key {key!r}")
            continue
        parts = pending.setdefault(key, {})
        parts[slot] = entry
        if len(parts) == 2:
            del pending[key]
            seen.add(key)
            yield _pair(key, parts["img"], parts["json"], full_json)
    for key, parts in pending.items():
        yield _pair(key, parts.get("img"), parts.get("json"), full_json)


@register
class SA1B(Source):
    name = "sam"

    def check(self, cfg) -> None:
        if cfg.annotations:
            raise ValueError("annotations is only used by journeydb, not sam")
        if cfg.synset_mapping:
            raise ValueError("synset_mapping is only used by imagenet, not sam")

    def list_shards(self, cfg) -> list[SourceShard]:
        return list_shards(cfg.source)

    def iter_samples(self, shard: SourceShard, cfg, ctx) -> Iterator[SourceSample]:
        return iter_samples(shard, full_json=cfg.decode.verify == "full")

"""ImageNet reader, in either layout:

- ILSVRC folders: `train/<wnid>/<wnid>_N.JPEG`; one shard per class folder. Labels come from
  `LOC_synset_mapping.txt` (0-based line number = class index), which this layout requires.
- webdataset shards (`timm/imagenet-1k-wds` style): `<key>.jpg` + `<key>.cls` (+ optional `<key>.json`) per sample.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator

from storage.errors import SourceError
from storage.ingest.sources.base import Source, SourceSample, SourceShard, list_archives, register
from storage.layout import safe_name, shard_name_of
from storage.tarstream import DEFAULT_MAX_MEMBER_BYTES, iter_tar, member_stem, too_large, utf8_name
from storage.urls import describe_error, filesystem, read_text, to_url

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".webp")
_WNID = re.compile(r"^n\d{8}$")


def load_synset_mapping(url: str) -> dict[str, int]:
    """`LOC_synset_mapping.txt`: '<wnid> <lemmas>' per line -> {wnid: line index}."""
    mapping: dict[str, int] = {}
    for line_no, line in enumerate(read_text(url).splitlines()):
        wnid = line.split(" ", 1)[0].strip()
        if not _WNID.match(wnid):
            raise SourceError(f"{url}:{line_no + 1}: expected '<wnid> <lemmas>', got {line[:60]!r}")
        mapping[wnid] = line_no
    if not mapping:
        raise SourceError(f"{url}: synset mapping is empty")
    return mapping


def list_shards(source: str) -> list[SourceShard]:
    """Class folders when `source` holds `n########/` directories, else webdataset tars."""
    fs, path = filesystem(source)
    try:
        is_dir = fs.isdir(path)
        entries = fs.ls(path, detail=True) if is_dir else []
    except Exception as e:  # noqa: BLE001 - backend errors become one clear line
        raise SourceError(describe_error(source, e)) from None
    folders = sorted(e["name"] for e in entries if e["type"] == "directory" and _WNID.match(posixpath.basename(
        e["name"].rstrip("/"))))
    if folders:
        return [SourceShard(name=posixpath.basename(f.rstrip("/")), url=to_url(fs, f), kind="folder") for f in folders]
    urls = list_archives(source, ("*.tar",), "ImageNet class folders (n########/) or webdataset tars")
    return [SourceShard(name=shard_name_of(u), url=u) for u in urls]


def _iter_folder(shard: SourceShard, mapping: dict[str, int]) -> Iterator[SourceSample]:
    label = mapping.get(shard.name)
    fs, path = filesystem(shard.url)
    try:
        entries = sorted(fs.ls(path, detail=True), key=lambda e: e["name"])
    except Exception as e:  # noqa: BLE001
        raise SourceError(describe_error(shard.url, e)) from None
    for entry in entries:
        name, not_utf8 = utf8_name(posixpath.basename(entry["name"]))
        stem, ext = member_stem(name)
        key = safe_name(stem)
        if entry.get("islink") or entry["type"] not in ("file", "directory"):
            yield SourceSample(key=key, member=name, error=f"non-regular file refused: {name!r}")
            continue
        if entry["type"] == "directory":
            continue
        if not_utf8:
            yield SourceSample(key=key, member=name, error=not_utf8)
            continue
        if ext not in IMAGE_EXTS:
            yield SourceSample(key=key, member=name, error=f"unexpected file {name!r}")
            continue
        if label is None:
            yield SourceSample(key=key, member=name, error=f"class folder {shard.name} is not in the synset mapping")
            continue
        if (entry.get("size") or 0) > DEFAULT_MAX_MEMBER_BYTES:  # never read whole: same limit as tar members
            yield SourceSample(key=key, member=name, error=too_large(entry["size"], DEFAULT_MAX_MEMBER_BYTES))
            continue
        yield SourceSample(key=key, member=name, data=fs.cat_file(entry["name"]),
                           fields={"label": label, "wnid": shard.name})


def _wds_sample(key: str, parts: dict, mapping: dict[str, int] | None) -> SourceSample:
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    cls = parts.get(".cls")
    if image is None:
        return SourceSample(key=key, member=(cls or next(iter(parts.values()))).name, error="label without an image")
    if cls is None:
        return SourceSample(key=key, member=image.name, error="image without a .cls label")
    try:
        label = int(cls.data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return SourceSample(key=key, member=image.name, error=f"malformed .cls label {cls.data[:20]!r}")
    wnid = key.split("_", 1)[0] if _WNID.match(key.split("_", 1)[0]) else None
    if mapping is not None and wnid is not None and mapping.get(wnid, label) != label:
        return SourceSample(key=key, member=image.name, error=f".cls {label} disagrees with mapping for {wnid}")
    return SourceSample(key=key, member=image.name, data=image.data, offset=image.offset,
                        fields={"label": label, "wnid": wnid})


def _iter_wds(shard: SourceShard, mapping: dict[str, int] | None) -> Iterator[SourceSample]:
    """Members of one sample are contiguous (webdataset convention); a key seen again later is a duplicate."""
    current, parts, done = None, {}, set()
    for entry in iter_tar(shard.url):
        if entry.truncated:
            if parts:
                yield SourceSample(key=current, member=next(iter(parts.values())).name,
                                   error=f"sample incomplete: {entry.error}")
            yield SourceSample(key=shard.name, error=entry.error)
            return
        base = posixpath.basename(entry.name)
        key_part, _, ext = base.partition(".")
        key = safe_name(posixpath.join(posixpath.dirname(entry.name), key_part))
        if entry.error:
            yield SourceSample(key=key, member=entry.name, error=entry.error)
            continue
        if key != current:
            if parts:
                yield _wds_sample(current, parts, mapping)
                done.add(current)
            current, parts = key, {}
        if key in done:
            yield SourceSample(key=key, member=entry.name, error=f"duplicate or non-contiguous key {key!r}")
            continue
        parts["." + ext.lower()] = entry
    if parts:
        yield _wds_sample(current, parts, mapping)


def iter_samples(shard: SourceShard, mapping: dict[str, int] | None) -> Iterator[SourceSample]:
    if shard.kind == "folder":
        if mapping is None:
            raise SourceError("ImageNet class folders need synset_mapping (LOC_synset_mapping.txt) for labels")
        return _iter_folder(shard, mapping)
    return _iter_wds(shard, mapping)


@register
class ImageNet(Source):
    name = "imagenet"
    conditioning = "class"

    def check(self, cfg) -> None:
        if cfg.annotations:
            raise ValueError("annotations is only used by journeydb, not imagenet")

    def list_shards(self, cfg) -> list[SourceShard]:
        shards = list_shards(cfg.source)
        if cfg.synset_mapping:
            load_synset_mapping(cfg.synset_mapping)  # a bad mapping fails the run now, not every shard
        elif any(s.kind == "folder" for s in shards):
            raise SourceError(f"{cfg.source}: ImageNet class folders need synset_mapping (LOC_synset_mapping.txt)")
        return shards

    def iter_samples(self, shard: SourceShard, cfg, ctx) -> Iterator[SourceSample]:
        mapping = load_synset_mapping(cfg.synset_mapping) if cfg.synset_mapping else None
        return iter_samples(shard, mapping)

"""The index side of the loader: which feature shards a run reads, and what their parquet indexes say about each
sample, checked before anything is read from a tar.

    shards = feature_shards(root, "sam", base_size=1024, multi_scale=True, caption_set="llava-...")
    entries = shard_entries(0, shards[0])    # the samples ok on every side, joined by key, in index order
    peek(shards[0])                          # shapes of the first sample (latent, T5 width, bucket)

The format itself (paths, schema, members) is `pixart.features.format`'s. An index that lists a key twice, or gives
a sample no byte range or no token count, is a `FeatureError` naming the index and the key.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from pixart.data.tar_reads import FeatureError, TarReader, naming
from pixart.features.format import LATENT_MEMBER, T5_MEMBER, latent_files, tar_of, text_files
from storage.commit import DONE_SUFFIX, is_done
from storage.layout import latents_dir, shard_of, text_features_dir
from storage.lineage import committed_identity
from storage.parquet import read_rows
from storage.urls import filesystem
from storage.wds import load_npy, sample_members


@dataclass(frozen=True)
class FeatureShard:
    """One shard's latent index (and text index, for captioned datasets), both committed."""

    name: str
    latents: str
    text: str | None = None
    base_size: int | None = None  # the latents' base size: fixes each bucket's latent shape (None: not checked)


@dataclass(frozen=True)
class Entry:
    """One sample as its shards' indexes describe it: byte ranges, plus what lets it be read directly (the tar
    offset of its .npy member and the fields its json would give), when the index has them."""

    shard: int
    key: str
    bucket: str
    latent: tuple[int, int]
    text: tuple[int, int] | None
    text_array: tuple[int, int] | None = None  # (offset of its .t5.npy member, n_tokens)
    latent_array: tuple[int, int, int, int | None] | None = None  # (offset of its .latent.npy, orig h, w, label)
    n_tokens: int | None = None  # T5 rows its text index promises


def feature_shards(root: str, dataset: str, base_size: int, multi_scale: bool = False,
                   caption_set: str | None = None) -> list[FeatureShard]:
    """Committed latent shards (joined with the caption set's text shards when given), in name order. A latent
    shard whose text shard is not committed yet is left out."""
    fs, path = filesystem(latents_dir(root, dataset, base_size, multi_scale))
    names = sorted(shard_of(p) for p in fs.glob(f"{path}/*.parquet")
                   if not p.endswith("/buckets.parquet"))
    shards = []
    for name in names:
        lat = latent_files(root, dataset, base_size, multi_scale, name).index
        txt = text_files(root, dataset, caption_set, name).index if caption_set else None
        if is_done(lat) and (txt is None or is_done(txt)):
            shards.append(FeatureShard(name, lat, txt, base_size))
    return shards


def feature_ids(shards: list[FeatureShard]) -> dict[str, str | None]:
    """The content identity of every feature shard a run reads, named as the extractor names its shards
    (`latents-<shard>`, `text-<shard>`): what a checkpoint records, so that a resume can tell changed features."""
    out: dict[str, str | None] = {}
    for s in shards:
        out[f"latents-{s.name}"] = committed_identity(s.latents)
        if s.text is not None:
            out[f"text-{s.name}"] = committed_identity(s.text)
    return out


def _states(directory: str) -> dict[str, str]:
    """{shard: "committed" | "uncommitted"} of the feature indexes in one directory, from one listing."""
    fs, path = filesystem(directory)
    if not fs.exists(path):
        return {}
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    return {n.removesuffix(".parquet"): "committed" if n + DONE_SUFFIX in names else "uncommitted"
            for n in names if n.endswith(".parquet") and n != "buckets.parquet"}


def incomplete_features(root: str, dataset: str, base_size: int, multi_scale: bool, caption_set: str | None,
                        expected: list[str]) -> list[str]:
    """The feature shards a run would skip: for each shard in `expected` (the dataset's committed manifests) and
    each latent shard present, `latents-<shard> (missing)` or `(uncommitted)`, and the same for `text-<shard>` when
    a caption set is given. `feature_shards` leaves such shards out silently; a run must not."""
    latents = _states(latents_dir(root, dataset, base_size, multi_scale))
    text = _states(text_features_dir(root, dataset, caption_set)) if caption_set else {}
    found = []
    for name in sorted(set(expected) | set(latents)):
        for kind, states in (("latents", latents), *((("text", text),) if caption_set else ())):
            state = states.get(name, "missing")
            if state != "committed":
                found.append(f"{kind}-{name} ({state})")
    return found


def _once(url: str, rows: list[dict[str, Any]]) -> None:
    """Refuse an index that lists a key more than once: it would be served twice, or one row silently win."""
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        key, n = Counter(keys).most_common(1)[0]
        raise FeatureError(f"{url}: key {key} has {n} rows in the index (one per key expected)")


def _span(url: str, row: dict[str, Any]) -> tuple[int, int]:
    span = row["offset"], row["bytes"]
    if type(span[0]) is not int or type(span[1]) is not int:
        raise FeatureError(f"{url}: sample {row['key']}: the index gives no byte range ({span})")
    return span


def shard_entries(index: int, shard: FeatureShard) -> list[Entry]:
    """The samples of one shard that are ok on every side, in index order."""
    text = {}
    if shard.text is not None:
        rows = read_rows(shard.text)
        _once(shard.text, rows)
        for r in rows:  # array_offset is absent from indexes written before it existed
            if r["status"] == "ok":
                tokens = r.get("n_tokens")
                at = r.get("array_offset")
                if at is not None and type(tokens) is not int:
                    raise FeatureError(f"{shard.text}: sample {r['key']}: the index gives no n_tokens ({tokens})")
                text[r["key"]] = _span(shard.text, r), None if at is None else (at, tokens), tokens
    out = []
    rows = read_rows(shard.latents)
    _once(shard.latents, rows)
    for r in rows:
        if r["status"] != "ok" or (shard.text is not None and r["key"] not in text):
            continue
        span, direct, tokens = text.get(r["key"], (None, None, None))
        latent = None
        if r.get("array_offset") is not None and r.get("orig_h") is not None:
            latent = (r["array_offset"], r["orig_h"], r["orig_w"], r.get("label"))
        out.append(Entry(index, r["key"], r["bucket"], _span(shard.latents, r), span, direct, latent, tokens))
    return out


def peek(shard: FeatureShard) -> dict[str, Any]:
    """Shapes of one shard's first sample: {"latent": (2C, h, w), "text_width": C or None, "bucket": key}."""
    entries = shard_entries(0, shard)
    if not entries:
        raise ValueError(f"{shard.latents}: no sample that is ok on every side")
    e = entries[0]
    with TarReader() as files:
        url = tar_of(shard.latents)
        with naming(url, e.key):
            files.check_span(url, e.latent)
            lat = load_npy(sample_members(files.read(url, e.latent), e.key)[LATENT_MEMBER])
        width = None
        if shard.text is not None and e.text is not None:
            url = tar_of(shard.text)
            with naming(url, e.key):
                files.check_span(url, e.text)
                width = int(load_npy(sample_members(files.read(url, e.text), e.key)[T5_MEMBER]).shape[1])
        return {"latent": tuple(lat.shape), "text_width": width, "bucket": e.bucket}

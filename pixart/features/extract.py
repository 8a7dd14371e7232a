"""Feature pre-extraction, one shard at a time: T5 text features of a caption shard, VAE latents of a manifest shard.

    result = extract_text_shard(caption_url, cfg, TextEncoder(...))       # features/<ds>/text/<set>/<shard>.tar
    result = extract_latent_shard(manifest_url, cfg, LatentEncoder(...))  # features/<ds>/latents/<size>/<shard>.tar

What a feature shard is (paths, index schema, members) is `pixart.features.format`'s. This module builds the
samples; the kit's `storage.shard.ShardWriter` writes them: a shard committed for the same lineage (input shard,
the settings below, the encoder) is skipped, a stale one redone, and a crash mid-shard resumes from the samples
already committed as parts. Executors (the local loops below, the Ray runtime in flows/) feed `TextShard` and
`LatentShard` alike.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pixart.buckets import Bucket, BucketError, apply_crop, assign, fixed_bucket
from pixart.features.clean import clean_caption
from pixart.features.config import ExtractConfig
from pixart.features.encoders import LatentEncoder, TextEncoder
from pixart.features.format import (
    INDEX_SCHEMA,
    LATENT_MEMBER,
    T5_MEMBER,
    ShardFiles,
    error_row,
    latent_files,
    latent_sample,
    npy_bytes,
    text_files,
    text_sample,
)
from storage.configio import config_dict
from storage.decode import decode_image
from storage.errors import ImageDecodeError, PipelineError
from storage.ingest.dedupe import duplicate_error, duplicates_identity, duplicates_of
from storage.layout import duplicates_url, shard_of
from storage.layout import manifest_url as manifest_url_of
from storage.lineage import lineage
from storage.parquet import read_rows
from storage.readers import iter_manifest_images
from storage.shard import OpenShard, Row, ShardResult, ShardWriter, why_pending


def text_files_of(cfg: ExtractConfig, shard: str) -> ShardFiles:
    """The text feature shard of caption shard `shard` under this config's root and caption set."""
    return text_files(cfg.output_root, cfg.dataset, cfg.caption_set or "", shard)


def latent_files_of(cfg: ExtractConfig, shard: str) -> ShardFiles:
    """The latent feature shard of manifest shard `shard` at this config's base size."""
    return latent_files(cfg.output_root, cfg.dataset, cfg.base_size, cfg.multi_scale, shard)


def text_settings(cfg: ExtractConfig) -> dict[str, Any]:
    """What changes a text feature besides its caption and the T5 model: its lineage settings."""
    return {"max_tokens": cfg.max_tokens, "clean_caption": cfg.clean_caption, "dtype": cfg.dtype}


def latent_settings(cfg: ExtractConfig) -> dict[str, Any]:
    """What changes a latent besides its image and the VAE: its lineage settings."""
    return {"base_size": cfg.base_size, "multi_scale": cfg.multi_scale, "bucket_policy": cfg.bucket_policy,
            "jpeg_draft": cfg.jpeg_draft, "decode": cfg.decode.model_dump(), "dtype": cfg.dtype}


def text_lineage(caption_url: str, cfg: ExtractConfig) -> dict[str, Any]:
    return lineage([caption_url], text_settings(cfg), {"t5": cfg.t5_model})


def latent_lineage(manifest_url: str, cfg: ExtractConfig, firsts: dict[str, str] | None = None) -> dict[str, Any]:
    """A latent shard is made from its manifest and its keys listed as duplicates (`firsts`, read when not given)."""
    shard = shard_of(manifest_url)
    if firsts is None:
        firsts = duplicates_of(cfg.output_root, cfg.dataset, shard)
    dups = {f"{duplicates_url(cfg.output_root, cfg.dataset)}#{shard}": duplicates_identity(firsts)}
    return lineage([manifest_url], latent_settings(cfg), {"vae": cfg.vae_model}, extra_inputs=dups)


def pending(kind: str, input_url: str, cfg: ExtractConfig) -> str | None:
    """Why the `kind` ("text" or "latents") feature shard of this input must be made ("missing", "stale: ...",
    "forced"); None when it is current."""
    if cfg.force:
        return "forced"
    redo = cfg.redo == "errors"
    if kind == "text":
        return why_pending(text_files_of(cfg, shard_of(input_url)).index, text_lineage(input_url, cfg), redo)
    return why_pending(latent_files_of(cfg, shard_of(input_url)).index, latent_lineage(input_url, cfg), redo)


class EncodeShard(OpenShard):
    """One feature shard being encoded, on the kit's writer (`pixart.data.index.FeatureShard` is a committed one, as
    the loader reads it). `writer.done` is the stored result when the shard is committed for the same lineage
    (nothing else is set up then); `todo` lists what is left to encode."""

    stage = ""

    def __init__(self, input_url: str, index_url: str, tar_url: str, cfg: ExtractConfig,
                 lineage_record: dict[str, Any]) -> None:
        self.input_url, self.cfg = input_url, cfg
        self.errors: dict[str, str] = {}  # keys that are error rows from the start (found while listing keys)
        result = ShardResult(stage=self.stage, dataset=cfg.dataset, shard=shard_of(input_url), input_url=input_url,
                             output_url=index_url)
        self.writer = ShardWriter.open(index_url, self.keys, INDEX_SCHEMA, result, lineage_record,
                                       config=config_dict(cfg),
                                       tar_url=tar_url, force=cfg.force, redo_errors=cfg.redo == "errors",
                                       part_rows=cfg.part_rows)
        self.result = result
        if self.done is None:
            try:
                self.writer.add([error_row(k, self.errors[k]) for k in self.writer.todo if k in self.errors])
            except BaseException:
                self.writer.abort()
                raise

    def keys(self) -> list[str]:
        """Every key the output must hold a row for; read under the shard's lease. Fills `errors`."""
        raise NotImplementedError


def run_local(shard: EncodeShard, work: Callable[[], None]) -> ShardResult:
    if shard.done is not None:
        return shard.done
    try:
        work()
    except BaseException:
        shard.abort()
        raise
    return shard.finalize()


# ---------------------------------------------------------------------------------------------------------------------
# Text: caption shard -> T5 features
# ---------------------------------------------------------------------------------------------------------------------


class TextShard(EncodeShard):
    """`chunks()`: (keys, texts) to encode, `text_batch_size` at a time; `accept(keys, texts, feats)` writes them.
    Missing or failed captions are error rows from the start."""

    stage = "extract-text"

    def __init__(self, caption_url: str, cfg: ExtractConfig) -> None:
        files = text_files_of(cfg, shard_of(caption_url))
        self.captions: dict[str, str] = {}
        super().__init__(caption_url, files.index, files.tar, cfg, text_lineage(caption_url, cfg))
        if self.done is None:
            self.todo = [k for k in self.writer.todo if k in self.captions]

    def keys(self) -> list[str]:
        """The manifest's keys, the caption shard checked against them: one row per manifest key. A key with two
        rows or none is an error row; a key the manifest does not have fails the shard (the caption shard is not
        this manifest's)."""
        caption_url, cfg = self.input_url, self.cfg
        manifest = manifest_url_of(cfg.output_root, cfg.dataset, shard_of(caption_url))
        keys = [r["key"] for r in read_rows(manifest, ["key"])]
        rows: dict[str, list[Row]] = {}
        for r in read_rows(caption_url, ["key", "text", "status", "error"]):
            rows.setdefault(r["key"], []).append(r)
        known = set(keys)
        stray = [k for k in rows if k not in known]
        if stray:
            more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
            raise PipelineError(f"{caption_url}: key {stray[0]!r}{more} is not in the manifest {manifest}; the "
                                f"caption shard is not this manifest's: re-caption it")
        for key in keys:
            found = rows.get(key, [])
            if not found:
                self.errors[key] = f"no caption row for this key in {caption_url}"
            elif len(found) > 1:
                self.errors[key] = f"{len(found)} caption rows for this key in {caption_url}"
            elif found[0]["status"] != "ok" or not (found[0]["text"] or "").strip():
                self.errors[key] = f"no caption: {found[0]['error'] or 'empty text'}"
            else:
                self.captions[key] = found[0]["text"]
        return keys

    def chunks(self) -> list[tuple[list[str], list[str]]]:
        out = []
        for i in range(0, len(self.todo), self.cfg.text_batch_size):
            keys = self.todo[i:i + self.cfg.text_batch_size]
            texts = [clean_caption(self.captions[k]) if self.cfg.clean_caption else self.captions[k] for k in keys]
            out.append((keys, texts))
        return out

    def accept(self, keys: list[str], texts: list[str], feats: list[np.ndarray]) -> None:
        for key, text, f in zip(keys, texts, feats, strict=True):
            members, fields = text_sample(f, self.captions[key], text if self.cfg.clean_caption else None)
            self.writer.add_sample(key, members, {**fields, "status": "ok", "error": None}, T5_MEMBER)

    def finalize(self) -> ShardResult:
        def count(rows: list[Row], result: ShardResult) -> None:
            result.stats["tokens"] = sum(r["n_tokens"] or 0 for r in rows if r["status"] == "ok")

        return self.writer.finalize(count=count)


def extract_text_shard(caption_url: str, cfg: ExtractConfig, encoder: TextEncoder,
                       progress: Callable[[int], None] | None = None) -> ShardResult:
    """T5 features of every ok caption of one caption shard; missing or failed captions become error rows."""
    shard = TextShard(caption_url, cfg)

    def work() -> None:
        for keys, texts in shard.chunks():
            shard.accept(keys, texts, encoder.encode(texts))
            if progress is not None:
                progress(len(keys))

    return run_local(shard, work)


# ---------------------------------------------------------------------------------------------------------------------
# Latents: manifest shard -> VAE posterior (mean, std), batched by bucket
# ---------------------------------------------------------------------------------------------------------------------


def bucket_of(row: Row, cfg: ExtractConfig) -> Bucket:
    """The image's bucket from its manifest size (after EXIF orientation); raises BucketError."""
    if cfg.multi_scale:
        return assign(row["height"], row["width"], cfg.base_size, cfg.bucket_policy)
    return fixed_bucket(cfg.base_size)


def prepare_image(row: Row, data: bytes, cfg: ExtractConfig) -> tuple[np.ndarray, dict]:
    """Decode in full (with `jpeg_draft`, a JPEG at the smallest DCT scale that still covers the bucket) and crop:
    (HxWx3 uint8, json fields)."""
    bucket = bucket_of(row, cfg)
    crop = bucket.crop(row["height"], row["width"])
    need = math.ceil(min(row["height"], row["width"]) * crop.resized[0] / row["height"]) if cfg.jpeg_draft else None
    image = decode_image(data, max_pixels=cfg.decode.max_pixels, max_decoded_bytes=cfg.decode.max_decoded_bytes,
                         min_side=need)
    pixels = np.asarray(apply_crop(image, crop), dtype=np.uint8)
    meta = {"bucket": bucket.key, "orig_hw": [row["height"], row["width"]], "resized_hw": list(crop.resized),
            "crop_box": list(crop.box), "base_size": cfg.base_size}
    return pixels, meta


def _prepared(item: tuple[Row, bytes | None, str | None], cfg: ExtractConfig):
    row, data, err = item
    if err is not None:
        return row, None, err
    try:
        pixels, meta = prepare_image(row, data, cfg)
    except ImageDecodeError as e:
        return row, None, f"image not decodable: {e}"
    return row, (pixels, meta), None


def bucket_groups(rows: list[Row], cfg: ExtractConfig, batch_size: int, threads: int = 1) -> Iterator[dict[str, Any]]:
    """Read, decode and crop `rows` (CPU work, on `threads` threads, in order, a bounded window ahead) and group
    them by bucket: {"keys", "pixels" [B,H,W,3] uint8, "metas"} per full (`batch_size`) or final group, {"key",
    "error"} per failure. Runs in the local loop and in Ray Data CPU tasks alike."""
    pending: dict[str, list[tuple[Row, np.ndarray, dict]]] = {}

    def group(items):
        return {"keys": [r["key"] for r, _, _ in items], "pixels": np.stack([p for _, p, _ in items]),
                "metas": [m for _, _, m in items]}

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode") as pool:
        window: deque = deque()
        source = iter_manifest_images(rows)
        while True:
            while len(window) < 4 * max(1, threads):
                item = next(source, None)
                if item is None:
                    break
                window.append(pool.submit(_prepared, item, cfg))
            if not window:
                break
            row, ready, err = window.popleft().result()
            if err is not None:
                yield {"key": row["key"], "error": err}
                continue
            pixels, meta = ready
            batch = pending.setdefault(meta["bucket"], [])
            batch.append((row, pixels, meta))
            if len(batch) == batch_size:
                yield group(pending.pop(meta["bucket"]))
    for items in pending.values():
        yield group(items)


class LatentShard(EncodeShard):
    """`todo`: manifest rows to read and encode (ok and inside a bucket); `accept(group, mean, std)` writes one
    encoded bucket group; `error(key, reason)` records a failure."""

    stage = "extract-latents"

    def __init__(self, manifest_url: str, cfg: ExtractConfig) -> None:
        files = latent_files_of(cfg, shard_of(manifest_url))
        self.rows: dict[str, Row] = {}
        self.firsts = duplicates_of(cfg.output_root, cfg.dataset, shard_of(manifest_url))  # key -> earlier shard
        super().__init__(manifest_url, files.index, files.tar, cfg, latent_lineage(manifest_url, cfg, self.firsts))
        if self.done is None:
            self.todo = [self.rows[k] for k in self.writer.todo if k in self.rows]

    def keys(self) -> list[str]:
        keys = []
        for r in read_rows(self.input_url):
            keys.append(r["key"])
            if r["status"] != "ok":
                self.errors[r["key"]] = f"not ingested: {r['error']}"
                continue
            if r["key"] in self.firsts:
                self.errors[r["key"]] = duplicate_error(r["key"], self.firsts[r["key"]])
                continue
            try:
                bucket_of(r, self.cfg)
                self.rows[r["key"]] = r
            except BucketError as e:
                self.errors[r["key"]] = str(e)
        return keys

    def error(self, key: str, reason: str) -> None:
        self.writer.add([error_row(key, reason)])

    def accept(self, group: dict[str, Any], mean: np.ndarray, std: np.ndarray) -> None:
        for key, meta, m, s in zip(group["keys"], group["metas"], mean, std, strict=True):
            if not (np.isfinite(m).all() and np.isfinite(s).all()):
                self.error(key, "VAE returned non-finite latents")
                continue
            members, fields = latent_sample(m, s, meta, self.rows[key].get("label"))
            self.writer.add_sample(key, members, {**fields, "status": "ok", "error": None}, LATENT_MEMBER)

    def finalize(self) -> ShardResult:
        def count(rows: list[Row], result: ShardResult) -> None:
            result.stats["buckets"] = len({r["bucket"] for r in rows if r.get("bucket")})

        return self.writer.finalize(count=count)


def latent_group_rows(item: dict[str, Any], cfg: ExtractConfig) -> Iterator[dict[str, Any]]:
    """`bucket_groups` over one shard's rows (item["rows"], JSON) as flat rows for a Ray Data CPU task: keys and
    metas as JSON, pixels as .npy bytes (b"" with the error of a row that failed)."""
    batch_size = cfg.vae_batch_size(cfg.ray.num_gpus_per_replica > 0)
    for g in bucket_groups(json.loads(item["rows"]), cfg, batch_size):
        if "error" in g:
            yield {"keys": json.dumps([g["key"]]), "metas": "[]", "error": g["error"], "pixels": b""}
        else:
            yield {"keys": json.dumps(g["keys"]), "metas": json.dumps(g["metas"]), "error": "",
                   "pixels": npy_bytes(g["pixels"])}


def extract_latent_shard(manifest_url: str, cfg: ExtractConfig, encoder: LatentEncoder,
                         progress: Callable[[int], None] | None = None) -> ShardResult:
    """VAE latents of every ok image of one manifest shard, one bucket per batch, decoding on CPU threads."""
    shard = LatentShard(manifest_url, cfg)

    def work() -> None:
        for group in bucket_groups(shard.todo, cfg, cfg.vae_batch_size(encoder.device.type == "cuda"),
                                   cfg.decode_threads):
            if "error" in group:
                shard.error(group["key"], group["error"])
                continue
            shard.accept(group, *encoder.encode(list(group["pixels"])))
            if progress is not None:
                progress(len(group["keys"]))

    return run_local(shard, work)

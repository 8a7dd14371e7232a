"""Feature pre-extraction, one shard at a time: T5 text features of a caption shard, VAE latents of a manifest shard.

    result = extract_text_shard(caption_url, cfg, TextEncoder(...))       # features/<ds>/text/<set>/<shard>.tar
    result = extract_latent_shard(manifest_url, cfg, LatentEncoder(...))  # features/<ds>/latents/<size>/<shard>.tar

Each output shard is a webdataset tar plus a parquet index beside it (`<shard>.parquet`, one row per input key:
ok with its bucket, token count and the byte range of its members in the tar, or error with a reason) and the
index's done marker, written last with the lineage (input shard and its marker hash, config hash, model ids).
A committed shard is skipped on a re-run; the shard's lease keeps a second run from doing the same work.

Tar members per sample (keys have no dots):
    text:    <key>.t5.npy   [n_tokens, d_model] float16, valid tokens only      <key>.json {caption, n_tokens}
    latents: <key>.latent.npy [8, h/8, w/8] float16: posterior mean then std     <key>.json {bucket, orig_hw,
             resized_hw, crop_box, base_size}  (+ <key>.cls for ImageNet)
Arrays are written with np.save(allow_pickle=False) and must be read with np.load(allow_pickle=False).
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from pixart.buckets import Bucket, BucketError, apply_crop, assign, fixed_bucket
from pixart.config import ExtractConfig
from pixart.encoders import LatentEncoder, TextEncoder
from storage.commit import commit_shard, write_done
from storage.configio import config_dict, config_hash
from storage.decode import decode_image
from storage.errors import ImageDecodeError
from storage.layout import latents_dir, shard_of, text_features_dir
from storage.lease import Lease
from storage.parquet import read_rows, write_table
from storage.readers import iter_manifest_images
from storage.shard import ShardResult, lineage, skipped
from storage.urls import join
from storage.wds import ShardTarWriter

Row = dict[str, Any]
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("bucket", pa.string()), ("n_tokens", pa.int32()),
                          ("offset", pa.int64()), ("bytes", pa.int64()),  # the sample's byte range in the tar
                          ("status", pa.string()), ("error", pa.string())])


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def clean_caption(text: str) -> str:
    """PixArt's caption cleaning, from diffusers (which applies it twice): URLs, HTML, IDs, punctuation runs."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import PixArtAlphaPipeline

    for _ in range(2):  # its _clean_caption reads only class attributes, so the class can stand in for `self`
        text = PixArtAlphaPipeline._clean_caption(PixArtAlphaPipeline, text)
    return text


def text_urls(cfg: ExtractConfig, shard: str) -> tuple[str, str]:
    base = join(text_features_dir(cfg.output_root, cfg.dataset, cfg.caption_set or ""), shard)
    return base + ".tar", base + ".parquet"


def latent_urls(cfg: ExtractConfig, shard: str) -> tuple[str, str]:
    base = join(latents_dir(cfg.output_root, cfg.dataset, cfg.base_size, cfg.multi_scale), shard)
    return base + ".tar", base + ".parquet"


class _Output:
    """One feature shard being written: the tar (created on the first sample) and the index rows."""

    def __init__(self, tar_url: str) -> None:
        self.tar_url, self.writer, self.index = tar_url, None, []

    def error(self, key: str, reason: str) -> None:
        self.index.append({"key": key, "status": "error", "error": reason})

    def write(self, key: str, members: dict[str, bytes], **fields: Any) -> None:
        if self.writer is None:
            self.writer = ShardTarWriter(self.tar_url).__enter__()
        offset, length = self.writer.write({"__key__": key, **members})
        self.index.append({"key": key, "offset": offset, "bytes": length, "status": "ok", "error": None, **fields})

    def close(self, failed: BaseException | None = None) -> None:
        if self.writer is not None:
            self.writer.__exit__(type(failed) if failed else None, failed, None)


def _commit(out: _Output, index_url: str, result: ShardResult, cfg: ExtractConfig, inputs: list[str],
            models: dict[str, str]) -> ShardResult:
    result.num_ok = sum(r["status"] == "ok" for r in out.index)
    result.num_error = len(out.index) - result.num_ok
    result.bytes = sum(r.get("bytes") or 0 for r in out.index)
    with commit_shard(index_url) as tmp:
        write_table(out.index, tmp, INDEX_SCHEMA)
    write_done(index_url, {**result.to_dict(), "tar_url": out.tar_url if out.writer else None,
                           "config": config_dict(cfg), "lineage": lineage(inputs, result.config_hash, models)})
    return result


def _run(stage: str, input_url: str, urls: tuple[str, str], cfg: ExtractConfig, work, models: dict[str, str]):
    tar_url, index_url = urls
    fixed = {"stage": stage, "dataset": cfg.dataset, "shard": shard_of(input_url), "input_url": input_url}
    if not cfg.force and (done := skipped(index_url, **fixed)) is not None:
        return done
    with Lease(index_url):
        if not cfg.force and (done := skipped(index_url, **fixed)) is not None:
            return done
        start = time.perf_counter()
        result = ShardResult(output_url=index_url, config_hash=config_hash(cfg), **fixed)
        out = _Output(tar_url)
        try:
            work(out, result)
        except BaseException as e:
            out.close(e)
            raise
        out.close()
        result.seconds = round(time.perf_counter() - start, 3)
        return _commit(out, index_url, result, cfg, [input_url], models)


# ---------------------------------------------------------------------------------------------------------------------
# Text: caption shard -> T5 features
# ---------------------------------------------------------------------------------------------------------------------


def extract_text_shard(caption_url: str, cfg: ExtractConfig, encoder: TextEncoder,
                       progress: Callable[[int], None] | None = None) -> ShardResult:
    """T5 features of every ok caption of one caption shard; missing or failed captions become error rows."""

    def work(out: _Output, result: ShardResult) -> None:
        rows = read_rows(caption_url, ["key", "text", "status", "error"])
        good = []
        for r in rows:
            if r["status"] != "ok" or not (r["text"] or "").strip():
                out.error(r["key"], f"no caption: {r['error'] or 'empty text'}")
            else:
                good.append(r)
        tokens = 0
        for i in range(0, len(good), cfg.text_batch_size):
            batch = good[i:i + cfg.text_batch_size]
            texts = [clean_caption(r["text"]) if cfg.clean_caption else r["text"] for r in batch]
            for r, text, feats in zip(batch, texts, encoder.encode(texts), strict=True):
                n = int(feats.shape[0])
                tokens += n
                meta = {"caption": r["text"], "n_tokens": n, **({"encoded_text": text} if cfg.clean_caption else {})}
                out.write(r["key"], {"t5.npy": npy_bytes(feats), "json": json.dumps(meta).encode()}, n_tokens=n)
            if progress is not None:
                progress(len(batch))
        result.stats["tokens"] = tokens

    return _run("extract-text", caption_url, text_urls(cfg, shard_of(caption_url)), cfg, work,
                {"t5": cfg.t5_model})


# ---------------------------------------------------------------------------------------------------------------------
# Latents: manifest shard -> VAE posterior (mean, std), batched by bucket
# ---------------------------------------------------------------------------------------------------------------------


def bucket_of(row: Row, cfg: ExtractConfig) -> Bucket:
    """The image's bucket from its manifest size (after EXIF orientation); raises BucketError."""
    if cfg.multi_scale:
        return assign(row["height"], row["width"], cfg.base_size, cfg.bucket_policy)
    return fixed_bucket(cfg.base_size)


def prepare_image(row: Row, data: bytes, bucket: Bucket, cfg: ExtractConfig) -> tuple[np.ndarray, dict]:
    """Decode (JPEG at the smallest scale that still covers the bucket) and crop: (HxWx3 uint8, json fields)."""
    crop = bucket.crop(row["height"], row["width"])
    need = math.ceil(min(row["height"], row["width"]) * crop.resized[0] / row["height"])
    image = decode_image(data, max_pixels=cfg.decode.max_pixels, max_decoded_bytes=cfg.decode.max_decoded_bytes,
                         min_side=need)
    pixels = np.asarray(apply_crop(image, crop), dtype=np.uint8)
    meta = {"bucket": bucket.key, "orig_hw": [row["height"], row["width"]], "resized_hw": list(crop.resized),
            "crop_box": list(crop.box), "base_size": cfg.base_size}
    return pixels, meta


def extract_latent_shard(manifest_url: str, cfg: ExtractConfig, encoder: LatentEncoder,
                         progress: Callable[[int], None] | None = None) -> ShardResult:
    """VAE latents of every ok image of one manifest shard, one bucket per batch."""

    def flush(out: _Output, items: list[tuple[Row, np.ndarray, dict]]) -> None:
        mean, std = encoder.encode([pixels for _, pixels, _ in items])
        for (row, _, meta), m, s in zip(items, mean, std, strict=True):
            if not (np.isfinite(m).all() and np.isfinite(s).all()):
                out.error(row["key"], "VAE returned non-finite latents")
                continue
            members = {"latent.npy": npy_bytes(np.concatenate([m, s])), "json": json.dumps(meta).encode()}
            if row.get("label") is not None:
                members["cls"] = str(row["label"]).encode()
            out.write(row["key"], members, bucket=meta["bucket"])
        if progress is not None:
            progress(len(items))

    def work(out: _Output, result: ShardResult) -> None:
        rows = read_rows(manifest_url)
        pending: dict[str, list[tuple[Row, np.ndarray, dict]]] = {}
        good = []
        for r in rows:
            if r["status"] != "ok":
                out.error(r["key"], f"not ingested: {r['error']}")
                continue
            try:
                r["_bucket"] = bucket_of(r, cfg)
                good.append(r)
            except BucketError as e:
                out.error(r["key"], str(e))
        for row, data, err in iter_manifest_images(good):
            if err is not None:
                out.error(row["key"], err)
                continue
            try:
                pixels, meta = prepare_image(row, data, row["_bucket"], cfg)
            except ImageDecodeError as e:
                out.error(row["key"], f"image not decodable: {e}")
                continue
            batch = pending.setdefault(meta["bucket"], [])
            batch.append((row, pixels, meta))
            if len(batch) == cfg.image_batch_size:
                flush(out, pending.pop(meta["bucket"]))
        for items in pending.values():
            flush(out, items)
        result.stats["buckets"] = len({r["bucket"] for r in out.index if r.get("bucket")})

    return _run("extract-latents", manifest_url, latent_urls(cfg, shard_of(manifest_url)), cfg, work,
                {"vae": cfg.vae_model})

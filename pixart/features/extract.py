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
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from pixart.buckets import Bucket, BucketError, apply_crop, assign, fixed_bucket
from pixart.features.config import ExtractConfig
from pixart.features.encoders import LatentEncoder, TextEncoder
from storage.commit import commit_shard, write_done
from storage.configio import config_dict, config_hash
from storage.decode import decode_image
from storage.errors import ImageDecodeError, PipelineError
from storage.layout import latents_dir, shard_of, text_features_dir
from storage.layout import manifest_url as manifest_url_of
from storage.lease import Lease
from storage.parquet import read_rows, write_table
from storage.readers import iter_manifest_images
from storage.shard import ShardResult, lineage, skipped
from storage.urls import join
from storage.wds import ShardTarWriter

Row = dict[str, Any]
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("bucket", pa.string()), ("n_tokens", pa.int32()),
                          ("offset", pa.int64()), ("bytes", pa.int64()),  # the sample's byte range in the tar
                          ("array_offset", pa.int64()),  # where its .npy member's tar header starts (null: parse)
                          ("orig_h", pa.int32()), ("orig_w", pa.int32()), ("label", pa.int64()),  # latents: json, cls
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

    def write(self, key: str, members: dict[str, bytes], array: str, **fields: Any) -> None:
        """One sample; `array` names its .npy member, whose header offset the index keeps for direct reads."""
        if self.writer is None:
            self.writer = ShardTarWriter(self.tar_url).__enter__()
        offset, length = self.writer.write({"__key__": key, **members})
        self.index.append({"key": key, "offset": offset, "bytes": length,
                           "array_offset": self.writer.members.get(array), "status": "ok", "error": None, **fields})

    def close(self, failed: BaseException | None = None) -> None:
        if self.writer is not None:
            self.writer.__exit__(type(failed) if failed else None, failed, None)


class FeatureShard:
    """One output shard end to end: lease, tar + index (`_Output`), commit with lineage. Executors (the local loop
    below, `flows/_ray_extract.py`) feed it; `TextShard` and `LatentShard` add what each kind needs.

    `done` holds the stored result when the shard is already committed (nothing else is set up then).
    """

    stage = ""

    def __init__(self, input_url: str, urls: tuple[str, str], cfg: ExtractConfig, models: dict[str, str]) -> None:
        self.input_url, self.cfg, self.models = input_url, cfg, models
        self.tar_url, self.index_url = urls
        fixed = {"stage": self.stage, "dataset": cfg.dataset, "shard": shard_of(input_url), "input_url": input_url}
        self.done = None if cfg.force else skipped(self.index_url, **fixed)
        if self.done is not None:
            return
        self.lease = Lease(self.index_url)
        self.lease.acquire()
        try:
            self.done = None if cfg.force else skipped(self.index_url, **fixed)  # finished by another run meanwhile
            if self.done is None:
                self.start = time.perf_counter()
                self.result = ShardResult(output_url=self.index_url, config_hash=config_hash(cfg), **fixed)
                self.out = _Output(self.tar_url)
                self.load()
        except BaseException:
            self.lease.release()  # bad input: nothing was published, the next run must not find the shard busy
            raise
        if self.done is not None:
            self.lease.release()

    def load(self) -> None:
        """Read the input shard (under the lease); a subclass's own set-up."""

    @property
    def name(self) -> str:
        return self.result.shard

    def abort(self, error: BaseException) -> None:
        """Give up: nothing is published, the lease is released."""
        try:
            self.out.close(error)
        finally:
            self.lease.release()

    def finish(self) -> ShardResult:
        try:
            self.out.close()
            out, result = self.out, self.result
            result.seconds = round(time.perf_counter() - self.start, 3)
            result.num_ok = sum(r["status"] == "ok" for r in out.index)
            result.num_error = len(out.index) - result.num_ok
            result.bytes = sum(r.get("bytes") or 0 for r in out.index)
            with commit_shard(self.index_url) as tmp:
                write_table(out.index, tmp, INDEX_SCHEMA)
            write_done(self.index_url, {**result.to_dict(), "tar_url": out.tar_url if out.writer else None,
                                        "config": config_dict(self.cfg),
                                        "lineage": lineage([self.input_url], result.config_hash, self.models)})
            return result
        finally:
            self.lease.release()


def _run_local(shard: FeatureShard, work) -> ShardResult:
    if shard.done is not None:
        return shard.done
    try:
        work()
    except BaseException as e:
        shard.abort(e)
        raise
    return shard.finish()


# ---------------------------------------------------------------------------------------------------------------------
# Text: caption shard -> T5 features
# ---------------------------------------------------------------------------------------------------------------------


class TextShard(FeatureShard):
    """`chunks()`: (keys, texts) to encode, `text_batch_size` at a time; `accept(keys, texts, feats)` writes them.
    Missing or failed captions are error rows from the start."""

    stage = "extract-text"

    def __init__(self, caption_url: str, cfg: ExtractConfig) -> None:
        super().__init__(caption_url, text_urls(cfg, shard_of(caption_url)), cfg, {"t5": cfg.t5_model})

    def load(self) -> None:
        """Check the caption shard against its manifest: one row per manifest key. A key with two rows or none is
        an error row; a key the manifest does not have fails the shard (the caption shard is not this manifest's)."""
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
        self.todo, self.captions = [], {}
        for key in keys:
            found = rows.get(key, [])
            if not found:
                self.out.error(key, f"no caption row for this key in {caption_url}")
            elif len(found) > 1:
                self.out.error(key, f"{len(found)} caption rows for this key in {caption_url}")
            elif found[0]["status"] != "ok" or not (found[0]["text"] or "").strip():
                self.out.error(key, f"no caption: {found[0]['error'] or 'empty text'}")
            else:
                self.captions[key] = found[0]["text"]
                self.todo.append(key)
        self.result.stats["tokens"] = 0

    def chunks(self) -> list[tuple[list[str], list[str]]]:
        out = []
        for i in range(0, len(self.todo), self.cfg.text_batch_size):
            keys = self.todo[i:i + self.cfg.text_batch_size]
            texts = [clean_caption(self.captions[k]) if self.cfg.clean_caption else self.captions[k] for k in keys]
            out.append((keys, texts))
        return out

    def accept(self, keys: list[str], texts: list[str], feats: list[np.ndarray]) -> None:
        for key, text, f in zip(keys, texts, feats, strict=True):
            n = int(f.shape[0])
            self.result.stats["tokens"] += n
            meta = {"caption": self.captions[key], "n_tokens": n,
                    **({"encoded_text": text} if self.cfg.clean_caption else {})}
            self.out.write(key, {"t5.npy": npy_bytes(f), "json": json.dumps(meta).encode()}, "t5.npy",
                           n_tokens=n)


def extract_text_shard(caption_url: str, cfg: ExtractConfig, encoder: TextEncoder,
                       progress: Callable[[int], None] | None = None) -> ShardResult:
    """T5 features of every ok caption of one caption shard; missing or failed captions become error rows."""
    shard = TextShard(caption_url, cfg)

    def work() -> None:
        for keys, texts in shard.chunks():
            shard.accept(keys, texts, encoder.encode(texts))
            if progress is not None:
                progress(len(keys))

    return _run_local(shard, work)


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


class LatentShard(FeatureShard):
    """`todo`: manifest rows to read and encode (ok and inside a bucket); `accept(group, mean, std)` writes one
    encoded bucket group; `error(key, reason)` records a failure."""

    stage = "extract-latents"

    def __init__(self, manifest_url: str, cfg: ExtractConfig) -> None:
        super().__init__(manifest_url, latent_urls(cfg, shard_of(manifest_url)), cfg, {"vae": cfg.vae_model})

    def load(self) -> None:
        cfg = self.cfg
        self.todo = []
        for r in read_rows(self.input_url):
            if r["status"] != "ok":
                self.out.error(r["key"], f"not ingested: {r['error']}")
                continue
            try:
                bucket_of(r, cfg)
                self.todo.append(r)
            except BucketError as e:
                self.out.error(r["key"], str(e))

    def error(self, key: str, reason: str) -> None:
        self.out.error(key, reason)

    def accept(self, group: dict[str, Any], mean: np.ndarray, std: np.ndarray) -> None:
        labels = {r["key"]: r.get("label") for r in self.todo} if not hasattr(self, "_labels") else self._labels
        self._labels = labels
        for key, meta, m, s in zip(group["keys"], group["metas"], mean, std, strict=True):
            if not (np.isfinite(m).all() and np.isfinite(s).all()):
                self.out.error(key, "VAE returned non-finite latents")
                continue
            members = {"latent.npy": npy_bytes(np.concatenate([m, s])), "json": json.dumps(meta).encode()}
            if labels.get(key) is not None:
                members["cls"] = str(labels[key]).encode()
            self.out.write(key, members, "latent.npy", bucket=meta["bucket"], orig_h=meta["orig_hw"][0],
                           orig_w=meta["orig_hw"][1], label=labels.get(key))

    def finish(self) -> ShardResult:
        if self.done is None:
            self.result.stats["buckets"] = len({r["bucket"] for r in self.out.index if r.get("bucket")})
        return super().finish()


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

    return _run_local(shard, work)

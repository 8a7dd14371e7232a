"""The feature-shard format, owned here: where a shard lives, its index schema, its members, one sample's bytes.

A feature shard is a pair of files plus the index's done marker (the marker is written last):

    features/<dataset>/text/<caption set>/<shard>.tar + .parquet        T5 features of one caption shard
    features/<dataset>/latents/<size>[-ms]/<shard>.tar + .parquet       VAE posteriors of one manifest shard

The index has one row per input key: ok with its bucket, token count and the byte range of its members in the tar
(`offset`, `bytes`; `array_offset` is where its .npy member's tar header starts, for direct reads), or error with
a reason. Tar members per sample (keys have no dots):

    text:    <key>.t5.npy      [n_tokens, d_model] float16, valid tokens only      <key>.json {caption, n_tokens}
    latents: <key>.latent.npy  [8, h/8, w/8] float16: posterior mean then std      <key>.json {bucket, orig_hw,
             resized_hw, crop_box, base_size}  (+ <key>.cls for ImageNet)

Arrays are written with np.save(allow_pickle=False) and read with np.load(allow_pickle=False) or
`storage.wds.load_npy`. The extractor (`pixart.features.extract`) writes samples with `text_sample` and
`latent_sample`; the loader (`pixart.data`) finds shards with `feature_shards` (`pixart/data/index.py`) and
reads the members named here.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from storage.layout import latents_dir, shard_of, text_features_dir
from storage.urls import join

T5_MEMBER = "t5.npy"
LATENT_MEMBER = "latent.npy"
JSON_MEMBER = "json"
CLASS_MEMBER = "cls"
FEATURE_DTYPE = np.dtype("<f2")
LATENT_CHANNELS = 8  # posterior mean (4) then std (4)

INDEX_SCHEMA = pa.schema([("key", pa.string()), ("bucket", pa.string()), ("n_tokens", pa.int32()),
                          ("offset", pa.int64()), ("bytes", pa.int64()),  # the sample's byte range in the tar
                          ("array_offset", pa.int64()),  # where its .npy member's tar header starts (null: parse)
                          ("orig_h", pa.int32()), ("orig_w", pa.int32()), ("label", pa.int64()),  # latents: json, cls
                          ("status", pa.string()), ("error", pa.string())])


@dataclass(frozen=True)
class ShardFiles:
    """The URL pair of one feature shard: the index (`.parquet`, whose done marker says the shard is committed)
    and the tar beside it."""

    index: str

    @property
    def tar(self) -> str:
        return self.index.removesuffix(".parquet") + ".tar"

    @property
    def name(self) -> str:
        return shard_of(self.index)

    def __iter__(self):
        """`tar, index = files`."""
        return iter((self.tar, self.index))


def text_files(root: str, dataset: str, caption_set: str, shard: str) -> ShardFiles:
    return ShardFiles(join(text_features_dir(root, dataset, caption_set), shard) + ".parquet")


def latent_files(root: str, dataset: str, base_size: int, multi_scale: bool, shard: str) -> ShardFiles:
    return ShardFiles(join(latents_dir(root, dataset, base_size, multi_scale), shard) + ".parquet")


def tar_of(index_url: str) -> str:
    """The tar beside a feature index."""
    return ShardFiles(index_url).tar


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def text_sample(features: np.ndarray, caption: str, encoded_text: str | None = None
                ) -> tuple[dict[str, bytes], dict[str, Any]]:
    """(members, index fields) of one caption's T5 features [n_tokens, d]; `encoded_text` is the cleaned text T5
    read, when it differs from the caption."""
    n = int(features.shape[0])
    meta = {"caption": caption, "n_tokens": n, **({"encoded_text": encoded_text} if encoded_text is not None else {})}
    return ({T5_MEMBER: npy_bytes(features.astype(FEATURE_DTYPE, copy=False)), JSON_MEMBER: json.dumps(meta).encode()},
            {"n_tokens": n})


def latent_sample(mean: np.ndarray, std: np.ndarray, meta: dict[str, Any], label: int | None
                  ) -> tuple[dict[str, bytes], dict[str, Any]]:
    """(members, index fields) of one image's posterior (mean, std: [4, h/8, w/8] each) and crop metadata."""
    members = {LATENT_MEMBER: npy_bytes(np.concatenate([mean, std]).astype(FEATURE_DTYPE, copy=False)),
               JSON_MEMBER: json.dumps(meta).encode()}
    if label is not None:
        members[CLASS_MEMBER] = str(label).encode()
    return members, {"bucket": meta["bucket"], "orig_h": meta["orig_hw"][0], "orig_w": meta["orig_hw"][1],
                     "label": label}


def error_row(key: str, reason: str) -> dict[str, Any]:
    return {"key": key, "status": "error", "error": reason}

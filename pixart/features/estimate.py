"""`pixart extract --estimate`: bytes per sample and in all, before a run, against the official layout.

Text: valid T5 tokens only, fp16 (the official layout stores 120 padded tokens in fp32: 1.97 MB at 4096 wide).
Latents: posterior mean and std, fp16, at each image's bucket or the square base size (official: fp32).
Token counts come from the caption set (`t5_tokens`, counted at caption time), sizes from the manifests.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pixart.buckets import BucketError, assign, fixed_bucket
from storage.config import DEFAULT_MAX_TOKENS

TAR_OVERHEAD = 2 * 1024 + 128 + 200  # two tar headers (+ padding), the npy header, a small json member


def t5_width(model_id: str) -> int:
    """d_model of the T5 encoder: read from a local config, else T5-XXL's 4096 (PixArt's encoder)."""
    path = os.path.join(model_id, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return int(json.load(f).get("d_model", 4096))
    return 4096


def latent_bytes(height: int, width: int, base_size: int, multi_scale: bool, policy: str, itemsize: int) -> int:
    try:
        bucket = assign(height, width, base_size, policy) if multi_scale else fixed_bucket(base_size)
    except BucketError:
        return 0
    return 8 * (bucket.height // 8) * (bucket.width // 8) * itemsize


def estimate(sizes: list[tuple[int, int]], tokens: list[int], *, base_size: int, multi_scale: bool, policy: str,
             d_model: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> dict[str, Any]:
    """Totals and per-sample means for this layout and for the official fp32, 120-token padded one."""
    text = [min(t, max_tokens) * d_model * 2 + TAR_OVERHEAD for t in tokens]
    lat = [latent_bytes(h, w, base_size, multi_scale, policy, 2) + TAR_OVERHEAD for h, w in sizes]
    official_text = max_tokens * d_model * 4 + max_tokens * 8  # fp32 features + int64 mask, per sample
    official_lat = [latent_bytes(h, w, base_size, multi_scale, policy, 4) for h, w in sizes]
    total = sum(text) + sum(lat)
    official = official_text * len(tokens) + sum(official_lat)
    return {"samples": len(sizes), "captions": len(tokens),
            "text_bytes_per_sample": sum(text) / max(1, len(text)),
            "latent_bytes_per_sample": sum(lat) / max(1, len(lat)),
            "total_bytes": total, "official_total_bytes": official, "ratio_to_official": total / max(1, official)}

"""Cost and storage arithmetic of the pipeline's steps, before they run: per-sample GPU rates, GPU-hours, checkpoint
and export bytes from a parameter count, counts extrapolated from a measured sample, human units. Arithmetic only:
torch is imported just to count a model's parameters on the meta device (no memory, no weights).
`flows/pipeline_cost.py` applies it to each step of the plan.

    rates = load_rates("h100", ["train_256=200"])     # configs/rates/h100.yaml, key=value applied last
    gpu_hours(150_000 * 11_392, rates.train(256))     # stage 2 at the paper's schedule: samples / rate
    checkpoint_bytes(610_856_096, ema=True, kept=3)   # fp32 model + EMA + AdamW moments, per checkpoint kept

The rates are bare-model rates of one card (the file says which): one in-memory batch through the model, no data
loading, I/O or communication, so they give a lower bound on a real run's GPU-hours.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import Field

from storage.configio import StrictModel, load_config

if TYPE_CHECKING:
    from pixart.model_config import ModelConfig

# Bytes a checkpoint holds per trained parameter (pixart/train/checkpoint.py): the model and its EMA as fp32
# safetensors, AdamW's exp_avg and exp_avg_sq in fp32 (optimizer.pt). An export holds one fp32 copy.
MODEL_BYTES, EMA_BYTES, ADAM_BYTES = 4, 4, 8

# Captions before any caption set exists (rough; captions are well under 0.1 % of a run's bytes): a parquet
# shard's schema and footer, each row's fixed fields, and per generated token ~4.5 characters stored twice
# (`caption` and `text`) at ~2x zstd compression. Measured: the demo's caption shards (4 rows of 40 tokens, 6.6 kB).
CAPTION_SHARD_BYTES, CAPTION_ROW_BYTES, CAPTION_TOKEN_BYTES = 5000, 60, 4
# A feature shard's parquet index (schema and footer, then ~40 B a row) and its tar's two end blocks, on top of the
# samples' members that `pixart.features.estimate` counts. Measured: the demo's index files (4 rows, 3.1 kB).
FEATURE_SHARD_BYTES, FEATURE_ROW_BYTES = 3000 + 1024, 40


class Rates(StrictModel):
    """Per-GPU rates of one card, in samples per second (configs/rates/)."""

    card: str = Field(description="The card the rates were measured on.")
    source: str = Field(description="Where the figures come from.")
    caption: float = Field(gt=0, description="LLaVA captions per second at caption_new_tokens new tokens.")
    caption_new_tokens: int = Field(gt=0, description="New tokens per caption of the `caption` rate.")
    t5: float = Field(gt=0, description="T5 encoder, captions per second (120 tokens).")
    vae_256: float = Field(gt=0, description="VAE encode, images per second at 256 px (bf16).")
    vae_512: float = Field(gt=0, description="VAE encode, images per second at 512 px (bf16).")
    vae_1024: float = Field(gt=0, description="VAE encode, images per second at 1024 px (bf16).")
    vae_256_fp32: float = Field(gt=0, description="VAE encode at 256 px in fp32.")
    vae_512_fp32: float = Field(gt=0, description="VAE encode at 512 px in fp32.")
    vae_1024_fp32: float = Field(gt=0, description="VAE encode at 1024 px in fp32.")
    train_256: float = Field(gt=0, description="PixArt-XL/2 training samples per second at 256 px.")
    train_512: float = Field(gt=0, description="PixArt-XL/2 training samples per second at 512 px.")
    train_1024: float = Field(gt=0, description="PixArt-XL/2 training samples per second at 1024 px.")

    def caption_at(self, new_tokens: int) -> float:
        """Captions per second at `new_tokens`: decoding is bound by its per-step overhead (flat over the batch),
        and a batch runs to its longest row, so time per image scales with the new tokens."""
        return self.caption * self.caption_new_tokens / new_tokens

    def vae(self, base_size: int, fp32: bool = False) -> float:
        return getattr(self, f"vae_{base_size}{'_fp32' if fp32 else ''}")

    def train(self, base_size: int) -> float:
        return getattr(self, f"train_{base_size}")


def load_rates(preset: str = "h100", overrides: list[str] | tuple[str, ...] = ()) -> Rates:
    """A rate table from configs/rates/ (or a YAML path), `key=value` overrides applied last."""
    return load_config(Rates, preset, overrides, kind="rates")


# ---------------------------------------------------------------------------------------------------------------------
# The arithmetic
# ---------------------------------------------------------------------------------------------------------------------


def gpu_hours(samples: float, per_s: float) -> float:
    """GPU-hours for `samples` at `per_s` samples per second per GPU."""
    return samples / per_s / 3600


def extrapolate(measured: float, shards_read: float, shards: int) -> float:
    """A count measured over `shards_read` shards (fractions for shards read in part), over all `shards`."""
    return measured / shards_read * shards if shards_read else 0.0


def train_samples(max_steps: int, batch_size: int, workers: int) -> int:
    """Samples a training step sees: steps x the global batch (batch per worker x workers)."""
    return max_steps * batch_size * workers


def checkpoints_kept(max_steps: int, every: int, keep: int) -> int:
    """Checkpoints on disk at the end: one every `every` steps and one at the last step, the newest `keep` kept."""
    return min(keep, math.ceil(max_steps / every))


def parameter_count(model: ModelConfig, resolution: int, caption_channels: int | None) -> int:
    """Trained parameters of a stage's model: a DiT without `caption_channels` (stage 1), else PixArt."""
    import torch

    from pixart.models import build_dit, build_pixart

    with torch.device("meta"):
        net = build_dit(model, resolution) if caption_channels is None else \
            build_pixart(model, resolution, caption_channels)
    return sum(p.numel() for p in net.parameters())


def checkpoint_bytes(params: int, ema: bool, kept: int) -> int:
    return params * (MODEL_BYTES + (EMA_BYTES if ema else 0) + ADAM_BYTES) * kept


def grid_bytes(images: int, resolution: int, max_steps: int, sample_every: int) -> int:
    """Sample grids of a run (pixart/train/run.py: every `sample_every` steps and at the end), as uncompressed RGB:
    an upper bound on their PNGs."""
    grids = (max_steps - 1) // sample_every + 1 if sample_every else 1
    return grids * images * resolution * resolution * 3


def caption_bytes(rows: float, shards: int, tokens: float) -> float:
    """Bytes of a caption set of `rows` captions of `tokens` tokens each, in `shards` shards (no set measured)."""
    return shards * CAPTION_SHARD_BYTES + rows * (CAPTION_ROW_BYTES + CAPTION_TOKEN_BYTES * tokens)


def feature_overhead(rows: float, shards: int) -> float:
    """Index and tar-end bytes of `shards` feature shards holding `rows` samples."""
    return shards * FEATURE_SHARD_BYTES + rows * FEATURE_ROW_BYTES


# ---------------------------------------------------------------------------------------------------------------------
# Human units
# ---------------------------------------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def human_count(n: float) -> str:
    """12 -> '12', 1_710_000_000 -> '1.71G'."""
    if abs(n) < 10_000:
        return f"{n:.0f}"
    for unit in ("k", "M", "G", "T"):
        n /= 1000
        if abs(n) < 1000 or unit == "T":
            return f"{n:.3g}{unit}"
    return str(n)


def human_hours(h: float) -> str:
    """GPU-hours with the digits that matter, never in exponent form: 14195.3 -> '14,195', 0.0000847 -> '0.000085'."""
    if h >= 100:
        return f"{h:,.0f}"
    if h <= 0:
        return "0"
    return f"{h:.{max(1, 1 - math.floor(math.log10(h)))}f}"

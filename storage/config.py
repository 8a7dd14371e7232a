"""Config pieces every command shares: the defaults named once (T5, VAE, token limit), the `dataset` field checked
against the source registry, and the base models the command configs build on.

    OutputConfig          output_root                                   train, and StageConfig
      StageConfig         + max_shards, force, create_bucket            ingest, caption, extract
    RayConfig             address                                       every `ray` section
      RayDataConfig       + num_gpus_per_replica, num_cpus_per_decoder  caption's and extract's Ray Data pools
    DecodeConfig          how image bytes are checked and decoded       ingest, caption, extract

A command's config declares only the fields it reads, so its `--help` lists nothing it ignores.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from storage.configio import StrictModel
from storage.decode import DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_PIXELS

DEFAULT_T5 = "DeepFloyd/t5-v1_1-xxl"  # PixArt-alpha's text encoder (T5 v1.1 XXL) and tokenizer
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # PixArt-alpha's VAE
DEFAULT_MAX_TOKENS = 120  # T5 tokens PixArt-alpha keeps per caption


def check_dataset(name: str) -> str:
    """`name` if a source reader is registered under it (storage/ingest/sources/), else a ValueError listing them."""
    from storage.ingest.sources import source_names  # the registry imports every source module

    known = source_names()
    if name not in known:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known)} (storage/ingest/sources/)")
    return name


Dataset = Annotated[str, AfterValidator(check_dataset)]


class DecodeConfig(StrictModel):
    """How image bytes are checked and decoded."""

    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="Larger images are refused (decompression bombs).")
    max_decoded_bytes: int = Field(DEFAULT_MAX_DECODED_BYTES, gt=0, description="Images whose decoded pixels "
                                   "(width x height x bytes per pixel) exceed this are refused before decoding.")
    verify: Literal["header", "full"] = Field(
        "header",
        description="header: image header + end marker, SA-1B JSON `image` object only (fast); "
        "full: also decode pixels (JPEG at 1/8 scale) and parse every SA-1B JSON whole.",
    )


class OutputConfig(StrictModel):
    """Where a command's outputs go."""

    output_root: str = Field("data/pixart", description="Root URL of every output (local path or s3://...).")


class StageConfig(OutputConfig):
    """A sharded stage: how many shards to do, whether to redo committed ones, whether to create the bucket."""

    max_shards: int | None = Field(None, gt=0, description="Only the first N shards (smoke runs).")
    force: bool = Field(False, description="Redo shards that are already committed.")
    redo: Literal["stale", "errors"] = Field(
        "stale", description="stale: do what is missing or stale; errors: also redo the error rows of committed "
        "shards (their ok rows are kept).")
    shards: list[str] = Field(default_factory=list, description="Only these shards, by name (e.g. [sa_000001]); "
                              "empty: all.")
    create_bucket: bool = Field(False, description="s3 output_root: create the bucket if it does not exist "
                                "(otherwise a missing bucket is an error, so a typo never creates one).")


class RayConfig(StrictModel):
    """Where Ray runs (flows/_ray.py joins it the same way for every executor)."""

    address: str | None = Field(None, description="Ray cluster address; None: RAY_ADDRESS if set, else a local Ray "
                                "started for the run.")


class RayDataConfig(RayConfig):
    """A Ray Data pipeline: CPU tasks decode images, GPU actors run the model (one replica per GPU)."""

    num_gpus_per_replica: float = Field(1.0, ge=0, description="GPUs per actor; 0 runs on CPU (tests).")
    num_cpus_per_decoder: float = Field(1.0, gt=0, description="CPUs per image-decoding task.")

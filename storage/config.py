"""Config models of the storage layer: image decoding and ingest. Presets live in `configs/ingest/`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from storage.configio import StrictModel
from storage.decode import DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_PIXELS
from storage.errors import ConfigError


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


class StageConfig(StrictModel):
    """Fields every stage repeats: where outputs go, how much to do, and whether to redo committed shards."""

    output_root: str = Field("data/pixart", description="Root URL of every output (local path or s3://...).")
    max_shards: int | None = Field(None, gt=0, description="Only the first N shards (smoke runs).")
    force: bool = Field(False, description="Redo shards that are already committed.")
    create_bucket: bool = Field(False, description="s3 output_root: create the bucket if it does not exist "
                                "(otherwise a missing bucket is an error, so a typo never creates one).")


class IngestConfig(StageConfig):
    """Turn source archives of one dataset into parquet manifests under `<output_root>/manifests/<dataset>/`."""

    dataset: str = Field(description="Which source reader (storage/sources/): sam (SA-1B), journeydb, imagenet.")
    source: str = Field(
        description="Directory, glob or single archive URL; for sam also the links TSV (file_name<TAB>cdn_link)."
    )
    annotations: str | None = Field(None, description="JourneyDB annotation jsonl (.jsonl, .jsonl.gz or .tgz).")
    synset_mapping: str | None = Field(None, description="ImageNet LOC_synset_mapping.txt (line number = class).")
    workers: int = Field(2, gt=0, description="Shards processed concurrently.")
    worker_type: Literal["process", "thread"] = Field(
        "process", description="process: one process per worker (scales with cores); thread: in-process threads "
        "(no start-up cost, per-image progress)."
    )
    hash: Literal["xxh3_128", "sha256"] = Field(
        "xxh3_128", description="Content hash per image (`hash` column): xxh3_128 (fast) or sha256 (also fills the "
        "`sha256` column, for matching published hash lists).")
    decode: DecodeConfig = Field(default_factory=DecodeConfig)

    @model_validator(mode="after")
    def _check(self) -> IngestConfig:
        from storage.sources import get_source

        try:
            source = get_source(self.dataset)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        source.check(self)
        return self

"""Config models every stage shares: image decoding (`DecodeConfig`) and the fields of a sharded stage
(`StageConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from storage.configio import StrictModel
from storage.decode import DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_PIXELS


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

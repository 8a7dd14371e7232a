"""Config of the feature pre-extraction stage. Presets live in `configs/extract/`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from storage.config import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_T5,
    DEFAULT_VAE,
    Dataset,
    DecodeConfig,
    RayDataConfig,
    StageConfig,
)
from storage.ingest.sources import captioned
from storage.lineage import RuntimeField


class RayExtractConfig(RayDataConfig):
    """Ray Data execution: CPU tasks decode and crop; one T5 and one VAE actor pool, one replica per GPU each."""

    t5_replicas: int = Field(1, gt=0, description="T5 encoder actors.")
    vae_replicas: int = Field(1, gt=0, description="VAE encoder actors.")
    t5_accelerator_type: str | None = Field(None, description="Ray accelerator type for T5 actors (e.g. H100).")
    vae_accelerator_type: str | None = Field(None, description="Ray accelerator type for VAE actors (e.g. L4).")


class ExtractConfig(StageConfig):
    """T5 text features of a caption set and/or VAE latents of a dataset, as webdataset tars under
    `<output_root>/features/<dataset>/text/<caption_set>/` and `.../latents/<base_size>/`."""

    dataset: Dataset = Field(description="An ingested dataset: sam, journeydb, imagenet.")
    what: Literal["text", "latents", "both"] = Field("both", description="Which features to extract.")
    caption_set: str | None = Field(None, description="Caption set to encode (text); not used for imagenet.")
    base_size: Literal[256, 512, 1024] = Field(256, description="Resolution of the latents.")
    multi_scale: bool = Field(False, description="Encode at each image's aspect-ratio bucket (stage 3) instead of "
                              "the square base_size crop.")
    bucket_policy: Literal["clamp", "drop"] = Field(
        "clamp", description="Images with h/w outside 0.25-4: clamp into the end bucket, or drop as an error row.")
    t5_model: str = Field(DEFAULT_T5, description="T5 encoder id or local dir (T5EncoderModel + tokenizer).")
    vae_model: str = Field(DEFAULT_VAE, description="AutoencoderKL id or local dir.")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, gt=0, description="T5 tokens kept per caption (PixArt-alpha: 120).")
    clean_caption: bool = Field(True, description="Clean captions before T5 as the official extractor does "
                                "(DeepFloyd-IF clean_caption, twice: lower case; URLs, HTML, CJK, IDs and "
                                "punctuation runs stripped), and as diffusers' PixArtAlphaPipeline cleans prompts "
                                "by default. false encodes the raw caption (a departure from the official recipe).")
    text_batch_size: int = RuntimeField(64, gt=0, description="Captions per T5 forward pass.")
    image_batch_size: int | None = RuntimeField(
        None, gt=0, description="Images per VAE forward pass (one bucket per batch); None: 16 on a GPU, 4 on a CPU, "
        "where a conv net's activations at larger batches overflow the caches and run slower (bench_extract.py).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="auto: bf16 GPU, fp32 CPU.")
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    jpeg_draft: bool = Field(
        False, description="Decode JPEGs at a reduced DCT scale where that still covers the crop (less decoding "
        "work). Off by default: the official transform decodes in full. Measured from 1500 px sources "
        "(benchmarks/jpeg_draft_error.py): crops differ by 0.55-0.75 levels on average, up to 44 levels at single "
        "pixels, at 256 and 512; not at all at 1024.")
    decode_threads: int = RuntimeField(2, gt=0, description="Local executor: threads decoding and cropping JPEGs.")
    part_rows: int = RuntimeField(256, gt=0, description="Samples committed together as one part of an unfinished "
                                  "shard: a crash loses at most this many; a re-run resumes past them.")
    executor: Literal["local", "ray"] = RuntimeField("local",
                                                     description="local: this process; ray: Ray Data actor pools.")
    ray: RayExtractConfig = RuntimeField(default_factory=RayExtractConfig)

    @property
    def encodes_text(self) -> bool:
        """T5 features are extracted: asked for (`what`), and the dataset is captioned (not class-labelled)."""
        return self.what in ("text", "both") and captioned(self.dataset)

    def vae_batch_size(self, on_gpu: bool) -> int:
        return self.image_batch_size or (16 if on_gpu else 4)

    @model_validator(mode="after")
    def _check(self) -> ExtractConfig:
        if self.encodes_text and not self.caption_set:
            raise ValueError("text features need caption_set=<name> (a set under captions/<dataset>/)")
        if not captioned(self.dataset) and self.what == "text":
            raise ValueError(f"{self.dataset} has class labels, not captions: extract latents")
        if self.multi_scale and self.base_size == 256:
            raise ValueError("multi_scale is for base_size 512 or 1024 (PixArt-alpha trains 256 at a fixed size)")
        return self

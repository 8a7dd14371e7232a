"""Config of the captioning stage. Presets live in `configs/caption/`."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal

from pydantic import Field, model_validator

from storage.config import DEFAULT_MAX_TOKENS, DEFAULT_T5, Dataset, DecodeConfig, RayDataConfig, StageConfig
from storage.configio import StrictModel
from storage.ingest.sources import get_source
from storage.lineage import RuntimeField

PAPER_PROMPT = "Describe this image and its style in a very detailed manner"
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"


class GenerationConfig(StrictModel):
    """Arguments of `generate()`. Greedy by default; `do_sample=true` uses temperature/top_p with `seed`."""

    max_new_tokens: int = Field(300, gt=0, description="Generation stops here (finish_reason 'length').")
    do_sample: bool = Field(False, description="Temperature sampling instead of greedy decoding.")
    temperature: float = Field(0.2, gt=0, description="Used only with do_sample (LLaVA's default 0.2).")
    top_p: float = Field(1.0, gt=0, le=1, description="Used only with do_sample.")
    num_beams: int = Field(1, ge=1, description="Beam search width (1: none).")
    repetition_penalty: float = Field(1.0, gt=0, description="1.0: off.")
    seed: int = Field(0, description="Seeds sampling; every batch starts from it, so runs are repeatable.")

    def generate_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": self.num_beams,
              "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        return kw


class RayCaptionConfig(RayDataConfig):
    """Ray Data execution: one model replica per GPU, decoding on CPU tasks alongside."""

    num_replicas: int = Field(1, gt=0, description="Captioner actors (model replicas).")


class CaptionConfig(StageConfig):
    """Caption the ok rows of `<output_root>/manifests/<dataset>/` into `<output_root>/captions/<dataset>/<set>/`."""

    renamed_keys = {"max_t5_tokens": "max_tokens"}

    dataset: Dataset = Field(description="Which ingested dataset to caption (sam, journeydb).")
    caption_set: str | None = RuntimeField(
        None, description="Name of this (model, prompt, generation) combination; default <model>-<hash>."
    )
    model: str = Field(DEFAULT_MODEL, description="Any LLaVA-family image-text-to-text model id or local dir.")
    prompt: str = Field(PAPER_PROMPT, min_length=1, description="User prompt, sent through the chat template.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    pad_to_square: bool = Field(True, description="Pad images to square (LLaVA-1.5 training) instead of cropping.")
    batch_size: int | Literal["auto"] = RuntimeField(
        16, description="Images per generate() call; auto: the most whose KV cache fits in the GPU's free memory "
        "(captioning/sizing.py; with engine=refill it sizes refill_rows and takes 4x that per call), 16 on CPU.")
    engine: Literal["generate", "refill"] = RuntimeField(
        "generate", description="generate: transformers' generate() (the reference); refill: greedy continuous "
        "batching (captioning.engine), same greedy captions, a finished row's slot takes the next image."
    )
    refill_rows: int | None = RuntimeField(
        None, gt=0, description="engine=refill: rows decoded together, refilled from the batch_size images of a "
        "call (None: batch_size, so no refills; set batch_size to a few times this)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="auto: bf16 GPU, fp32 CPU.")
    t5_tokenizer: str = Field(DEFAULT_T5, description="T5 whose tokenizer counts each caption's tokens (id or dir; "
                              "the features' t5_model).")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, gt=0, description="T5 tokens kept per caption (PixArt-alpha: 120); "
                            "longer captions are flagged t5_truncated.")
    training_text: Literal["llava", "prompt", "caption"] = Field(
        "llava", description="JourneyDB: text used for training: LLaVA caption, Midjourney prompt, or Task2.Caption."
    )
    part_rows: int = RuntimeField(256, gt=0,
                                  description="Rows per resumable part file (a crash loses at most this many).")
    prefetch_batches: int = RuntimeField(2, ge=1, description="Batches decoded ahead of generation on CPU threads.")
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    executor: Literal["local", "ray"] = RuntimeField("local",
                                                     description="local: in process; ray: Ray Data actor pool.")
    ray: RayCaptionConfig = RuntimeField(default_factory=RayCaptionConfig)

    @model_validator(mode="after")
    def _check(self) -> CaptionConfig:
        if self.training_text != "llava" and not get_source(self.dataset).has_prompts:
            raise ValueError(f"training_text other than 'llava' needs a dataset with its own prompts, such as "
                             f"journeydb ({self.dataset} has none)")
        g = self.generation
        if self.engine == "refill" and (g.do_sample or g.num_beams != 1 or g.repetition_penalty != 1.0):
            raise ValueError("engine=refill is greedy-only: it needs generation.do_sample=false, num_beams=1 and "
                             "repetition_penalty=1.0 (use engine=generate for sampling, beams or penalties)")
        if isinstance(self.batch_size, int) and self.batch_size <= 0:
            raise ValueError("batch_size must be a positive number or auto")
        if self.batch_size == "auto" and self.executor == "ray":
            raise ValueError("batch_size=auto sizes batches from a replica's GPU, but executor=ray fixes them on the "
                             "driver: give a number")
        if self.caption_set is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.caption_set):
            raise ValueError("caption_set may hold only letters, digits, '.', '_' and '-'")
        return self

    def identity(self) -> dict:
        """What defines a caption set: changing any of it makes a new set."""
        return {"model": self.model, "prompt": self.prompt, "generation": self.generation.model_dump(),
                "pad_to_square": self.pad_to_square}

    def prompt_hash(self) -> str:
        return hashlib.sha256(self.prompt.encode()).hexdigest()[:12]

    def resolved_caption_set(self) -> str:
        if self.caption_set:
            return self.caption_set
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.model.rstrip("/").rsplit("/", 1)[-1]).strip("-").lower()
        return f"{slug}-{digest}"

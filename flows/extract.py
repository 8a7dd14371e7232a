"""Prefect flow `extract`: T5 text features and VAE latents of one dataset, one task per shard.

    prefect deployment run extract/extract-sam-256 -p caption_set=llava-1-5-7b-hf-1a2b3c4d -p output_root=/data/pixart

The work is `flows/extract_stage.py` on the stage kit (`flows/_stage.py`), the same code `pixart extract` runs
locally. Artifacts: `extract-<dataset>-progress`, `extract-<dataset>-buckets` (the bucket histogram).
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows._prefect import Redo, run_as_flow, with_typed
from flows.extract_stage import ExtractStage


@flow(name="extract", task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=True)
def extract(config: str = "extract/sam-256", overrides: list[str] | None = None, force: bool = False,
            output_root: str | None = None, caption_set: str | None = None, text_batch_size: int | None = None,
            image_batch_size: int | None = None, executor: Literal["local", "ray"] | None = None,
            max_shards: int | None = None, shards: list[str] | None = None, redo: Redo | None = None):
    """Extract features into `<output_root>/features/<dataset>/`.

    Args:
        config: preset name (`sam-256`, `sam-1024`, `journeydb-256`, `journeydb-512`, `journeydb-1024`,
            `imagenet-256`) or a YAML path.
        overrides: `key=value` strings applied after the preset and the fields below (they win), e.g.
            `t5_model=/models/t5-v1_1-xxl`.
        force: redo shards that are already committed.
        output_root: root of every output (local path or s3://...); empty: the preset's.
        caption_set: the caption set whose captions T5 encodes (not for imagenet); empty: the preset's.
        text_batch_size: captions per T5 forward pass; empty: the preset's.
        image_batch_size: images per VAE forward pass; empty: the preset's (16 on a GPU, 4 on a CPU).
        executor: local (in the worker's process) or ray (Ray Data actor pools); empty: the preset's.
        max_shards: only the first N shards (smoke runs); empty: all.
        shards: only these shards, by name (e.g. sa_000001); empty: the preset's (all).
        redo: stale: do what is missing or stale; errors: also redo the error rows of committed shards.
    """
    typed = {"output_root": output_root, "caption_set": caption_set, "text_batch_size": text_batch_size,
             "image_batch_size": image_batch_size, "executor": executor, "max_shards": max_shards,
             "shards": shards, "redo": redo}
    return run_as_flow(ExtractStage(), config, with_typed(overrides, typed), force)

"""Prefect flow `caption`: LLaVA captions for every committed manifest shard of SA-1B or JourneyDB.

    prefect deployment run caption/caption-sam -p output_root=/data/pixart -p batch_size=auto

The work is `flows/caption_stage.py` on the stage kit (`flows/_stage.py`), the same code `pixart caption` runs
locally. Artifacts: progress, a table of sample captions, and a caption-quality report (also saved as quality.md
beside the captions).
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows._prefect import Redo, run_as_flow, with_typed
from flows.caption_stage import CaptionStage


@flow(name="caption", task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=True)
def caption(config: str = "caption/sam", overrides: list[str] | None = None, force: bool = False,
            output_root: str | None = None, caption_set: str | None = None, model: str | None = None,
            batch_size: int | Literal["auto"] | None = None, executor: Literal["local", "ray"] | None = None,
            max_shards: int | None = None, shards: list[str] | None = None, redo: Redo | None = None):
    """Caption the committed manifests of one dataset into `<output_root>/captions/<dataset>/<caption_set>/`.

    Args:
        config: preset name (`sam`, `journeydb`, `caption/<name>`) or a YAML path.
        overrides: `key=value` strings applied after the preset and the fields below (they win), e.g.
            `generation.max_new_tokens=200`.
        force: re-caption shards already committed in this caption set.
        output_root: root of every output (local path or s3://...); empty: the preset's.
        caption_set: name of the caption set written; empty: <model>-<hash>.
        model: LLaVA-family model id or local directory; empty: the preset's.
        batch_size: images per generate() call, or auto (the most that fit the GPU); empty: the preset's.
        executor: local (in the worker's process) or ray (a Ray Data actor pool); empty: the preset's.
        max_shards: only the first N shards (smoke runs); empty: all.
        shards: only these shards, by name (e.g. sa_000001); empty: the preset's (all).
        redo: stale: do what is missing or stale; errors: also redo the error rows of committed shards.
    """
    typed = {"output_root": output_root, "caption_set": caption_set, "model": model, "batch_size": batch_size,
             "executor": executor, "max_shards": max_shards, "shards": shards, "redo": redo}
    return run_as_flow(CaptionStage(), config, with_typed(overrides, typed), force)

"""Prefect flow `train`: one PixArt-alpha training stage, locally or on Ray Train.

    prefect deployment run train/train-stage2 -p init=/data/pixart/runs/stage1-imagenet-256 \
        -p caption_set=llava-1-5-7b-hf-1a2b3c4d -p output_root=/data/pixart -p batch_size=64

Stage 3 is three deployments, run in order, each from the previous run's directory: train-stage3-hq256 (256),
train-stage3-hq512 (512), train-stage3-ms1024 (1024 multi-scale).

The work is `flows/train_stage.py` on the stage kit (`flows/_stage.py`), the same code `pixart train` runs locally:
the run is one task, retried for transient errors only; a retry (or a re-run with the same run name) resumes from
the run's latest checkpoint. Every `schedule.log_every` steps a line `step N/M: loss ..., grad_norm ..., lr ...,
... samples/s` goes to the run's logs (on Ray, as metrics.jsonl is flushed at each checkpoint). Artifacts:
`train-<run>-progress` (steps logged), `train-<run>-samples` (the last sample grid), `train-<run>-cost` (GPU-hours
next to the paper's) and the kit's `train-<run>-shards` (the run's one row).
"""

from __future__ import annotations

from typing import Literal

from prefect import flow

from flows._prefect import run_as_flow, with_typed
from flows.train_stage import TrainStage


@flow(name="train", validate_parameters=True)
def train(config: str = "train/stage2", init: str | None = None, overrides: list[str] | None = None,
          output_root: str | None = None, run: str | None = None, caption_set: str | None = None,
          max_steps: int | None = None, batch_size: int | None = None,
          executor: Literal["local", "ray"] | None = None, num_workers: int | None = None):
    """Train one stage to its max_steps.

    Args:
        config: preset (`stage1`, `stage2`, stage 3's steps `stage3-256`, `stage3-512`, `stage3-1024`,
            `tiny-stage*`) or a YAML path.
        init: the previous stage's run directory (its latest committed checkpoint), checkpoint or export, or a DiT
            (stage 2: re-parameterised); empty: the preset's. `init_weights=model|ema` (an override) picks which
            weights of it.
        overrides: `key=value` strings applied after the preset and the fields here (they win), e.g.
            `optim.lr=1e-5`, `schedule.log_every=50`.
        output_root: root of the features and runs (local path or s3://...); empty: the preset's.
        run: run name (runs/<run>/); a re-run of the same name resumes; empty: the preset's.
        caption_set: the features' caption set (data.caption_set; not for stage 1); empty: the preset's.
        max_steps: optimizer steps of this stage (schedule.max_steps); empty: the preset's.
        batch_size: samples per step per worker (data.batch_size); empty: the preset's.
        executor: local (in the worker's process) or ray (Ray Train); empty: the preset's.
        num_workers: Ray Train workers, one per GPU (ray.num_workers); empty: the preset's.
    """
    typed = {"output_root": output_root, "init": init, "run": run, "data.caption_set": caption_set,
             "schedule.max_steps": max_steps, "data.batch_size": batch_size, "executor": executor,
             "ray.num_workers": num_workers}
    return run_as_flow(TrainStage(log_steps=True), config, with_typed(overrides, typed), False)

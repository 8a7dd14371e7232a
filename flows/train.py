"""Prefect flow `train`: one PixArt-alpha training stage, locally or on Ray Train.

    prefect deployment run train/train-stage2 -p init=/data/pixart/runs/stage1-imagenet-256 \
        -p overrides='["data.caption_set=llava-1-5-7b-hf-1a2b3c4d", "output_root=/data/pixart"]'

Stage 3 is three deployments, run in order, each from the previous run's directory: train-stage3-hq256 (256),
train-stage3-hq512 (512), train-stage3-ms1024 (1024 multi-scale).

A retry (or a re-run with the same run name) resumes from the run's latest checkpoint. Artifacts:
`train-<run>-progress` (steps done, from checkpoints), `train-<run>-samples` (the last sample grid) and
`train-<run>-cost` (GPU-hours next to the paper's).
"""

from __future__ import annotations

import base64
import contextvars
import json
import threading

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Completed, Failed

from flows.train_stage import load_train_config, run_training
from pixart.train.monitor import metrics_url
from storage.errors import PipelineError
from storage.layout import run_dir
from storage.urls import exists, filesystem, join, open_url


def _watch(cfg, stop: threading.Event) -> None:
    """Progress from metrics.jsonl (flushed at each checkpoint), also when the steps run on Ray workers."""
    key = f"train-{cfg.run}-progress".lower()
    progress = create_progress_artifact(0.0, key=key, description=f"{cfg.run}: starting")
    url = metrics_url(cfg.output_root, cfg.run)
    while not stop.wait(15):
        if exists(url):
            with open_url(url, "rb") as f:
                lines = f.read().decode().strip().splitlines()
            if lines:
                step = int(json.loads(lines[-1])["step"])
                update_progress_artifact(progress, 100.0 * step / cfg.schedule.max_steps,
                                         description=f"{cfg.run}: step {step} of {cfg.schedule.max_steps}")


def _samples_artifact(cfg) -> None:
    fs, path = filesystem(join(run_dir(cfg.output_root, cfg.run), "samples"))
    grids = sorted(fs.glob(f"{path}/step-*.png"))
    if grids:
        data = base64.b64encode(fs.cat_file(grids[-1])).decode()
        create_markdown_artifact(f"![samples](data:image/png;base64,{data})\n\n`{grids[-1]}`",
                                 key=f"train-{cfg.run}-samples".lower(), description="latest sample grid")


@flow(name="train", validate_parameters=True)
def train(config: str = "train/stage2", init: str | None = None, overrides: list[str] | None = None):
    """Train one stage to its max_steps.

    Args:
        config: preset (`stage1`, `stage2`, stage 3's steps `stage3-256`, `stage3-512`, `stage3-1024`,
            `tiny-stage*`) or a YAML path.
        init: the previous stage's run directory (its latest committed checkpoint), checkpoint or export, or a DiT
            (stage 2: re-parameterised); None: the preset's. `init_weights=model|ema` (an override) picks which
            weights of it.
        overrides: `key=value` strings, e.g. `data.caption_set=<name>`, `ray.num_workers=64`.
    """
    logger = get_run_logger()
    try:
        cfg = load_train_config(config, overrides, init)
    except PipelineError as e:
        return Failed(message=str(e))
    stop = threading.Event()
    context = contextvars.copy_context()  # the flow run's context, so the watcher's artifacts belong to it
    watcher = threading.Thread(target=context.run, args=(_watch, cfg, stop), daemon=True)
    watcher.start()
    try:
        summary = run_training(cfg, log=logger.info)
    except PipelineError as e:
        logger.error(str(e))
        return Failed(message=str(e))
    finally:
        stop.set()
    _samples_artifact(cfg)
    create_table_artifact([summary], key=f"train-{cfg.run}-cost".lower(),
                          description="steps, GPU-hours and the paper's V100-days for this stage")
    return Completed(message=f"{cfg.run}: {summary['steps']} steps, {summary['gpu_hours']:.2f} GPU-hours",
                     data=summary)

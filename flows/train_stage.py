"""A training stage from a preset: check and prepare on the driver, then train here or on Ray Train.

Shared by `pixart train` (flows/cli.py) and the Prefect flow `train` (flows/train.py). Nothing here imports Ray
unless executor=ray.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pixart.monitor import metrics_url
from pixart.prepare import prepare_run
from pixart.train_config import TrainConfig
from storage.configio import load_config
from storage.layout import run_dir
from storage.urls import join, open_url


def load_train_config(config: str, overrides: list[str] | None = None, init: str | None = None) -> TrainConfig:
    extra = list(overrides or []) + ([f"init={init}"] if init else [])
    return load_config(TrainConfig, config, extra, kind="train")


def run_training(cfg: TrainConfig, log: Callable[[str], None] = print,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train `cfg` to schedule.max_steps (resuming a run of the same name); returns the cost summary."""
    # refuses contradicting presets before any worker (or GPU) starts; on Ray the conditions are encoded in a task
    found = prepare_run(cfg, encode=cfg.executor != "ray")
    log(f"stage {cfg.stage} run {cfg.run}: {found['shards']} feature shards of {cfg.data.dataset}, "
        f"{cfg.model.preset} at {cfg.resolution}{' multi-scale' if cfg.data.multi_scale else ''}, "
        f"{cfg.schedule.max_steps} steps, executor {cfg.executor}; metrics: {metrics_url(cfg.output_root, cfg.run)}")
    if cfg.executor == "ray":
        from flows._ray_train import run_ray

        run_ray(cfg, text_width=found["text_width"])
        with open_url(join(run_dir(cfg.output_root, cfg.run), "summary.json"), "rb") as f:
            return {**json.loads(f.read()), "run": cfg.run}
    from pixart.run import train_worker

    return train_worker(cfg, progress=progress)

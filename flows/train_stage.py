"""A training stage from a preset: check and prepare on the driver, then train here or on Ray Train.

Shared by `pixart train` (flows/cli.py) and the Prefect flow `train` (flows/train.py). Nothing here imports Ray
unless executor=ray.

A run holds a lease on its directory (`runs/<run>.lease`, storage/lease.py) from its checks to its end, so two runs
of one name never write (or prune) the same checkpoints; with it held, the checkpoint temporaries of a killed save
are swept. Nothing of the run is written until it can start: the checks come first (`check_run`); locally the
trainer is built and resumed before the conditions and config.yaml are written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pixart.train.config import STAGE_PRESETS, TrainConfig
from pixart.train.monitor import metrics_url
from pixart.train.prepare import check_run, prepare_conditions, write_config
from storage.configio import load_config
from storage.errors import ConfigError, PipelineError, ShardBusyError
from storage.layout import run_dir
from storage.lease import Lease
from storage.urls import join, open_url


class RunBusyError(PipelineError):
    """Another live process is running a run of the same name."""


def stage_preset(stage: int | None, step: str | None = None) -> str:
    """The preset of `pixart train --stage N [--step S]` (`STAGE_PRESETS`). Stage 3 is three runs, each from the
    one before, so it must name its step; stages 1 and 2 have none."""
    steps = ", ".join(f"{s} ({p})" for (n, s), p in STAGE_PRESETS.items() if n == 3)
    if stage == 3 and step is None:
        raise ConfigError(f"stage 3 is three steps, each its own run from the previous one's weights: give --step, "
                          f"one of {steps}, in that order")
    if stage in (1, 2) and step is not None:
        raise ConfigError(f"--step {step}: only stage 3 has steps ({steps}); stage {stage} has none")
    preset = STAGE_PRESETS.get((stage, step)) if stage is not None else None
    if preset is None:
        raise ConfigError(f"no preset for --stage {stage}{f' --step {step}' if step else ''}: give --stage 1|2, or "
                          f"--stage 3 --step with one of {steps}")
    return preset


def load_train_config(config: str, overrides: list[str] | None = None, init: str | None = None) -> TrainConfig:
    extra = list(overrides or []) + ([f"init={init}"] if init else [])
    return load_config(TrainConfig, config, extra, kind="train")


def run_lease(cfg: TrainConfig) -> Lease:
    """The run's lease: `<output_root>/runs/<run>.lease`."""
    return Lease(run_dir(cfg.output_root, cfg.run))


def run_training(cfg: TrainConfig, log: Callable[[str], None] = print,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train `cfg` to schedule.max_steps (resuming a run of the same name); returns the cost summary."""
    from pixart.train import checkpoint

    lease = run_lease(cfg)
    try:
        lease.acquire()
    except ShardBusyError as e:
        raise RunBusyError(f"run {cfg.run} is running in another process ({e}); wait for it to end, or choose "
                           "another run name") from None
    try:
        swept = checkpoint.sweep_temporaries(cfg.output_root, cfg.run)
        if swept:
            log(f"run {cfg.run}: removed {len(swept)} checkpoint temporaries of a killed save: {', '.join(swept)}")
        # refuses contradicting presets before any worker (or GPU) starts; on Ray the conditions are encoded in a task
        found = check_run(cfg)
        log(f"stage {cfg.stage} run {cfg.run}: {found['shards']} feature shards of {cfg.data.dataset}, "
            f"{cfg.model.preset} at {cfg.resolution}{' multi-scale' if cfg.data.multi_scale else ''}, "
            f"{cfg.schedule.max_steps} steps, executor {cfg.executor}; metrics: "
            f"{metrics_url(cfg.output_root, cfg.run)}")
        if cfg.executor == "ray":
            return _run_ray(cfg, found)
        return _run_local(cfg, found, log, progress)
    finally:
        lease.release()


def _run_local(cfg: TrainConfig, found: dict[str, Any], log: Callable[[str], None],
               progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    from pixart.train.run import train_worker
    from pixart.train.trainer import Trainer

    conditions = prepare_conditions(cfg, found["text_width"], save=False)  # in memory until the run can start
    trainer = Trainer(cfg, conditions=conditions)
    trainer.resume(log=log)
    if conditions is not None and not conditions.stored(cfg):
        conditions.save(cfg)
    write_config(cfg)
    return train_worker(cfg, progress=progress, trainer=trainer)


def _run_ray(cfg: TrainConfig, found: dict[str, Any]) -> dict[str, Any]:
    from flows._ray_train import run_ray

    run_ray(cfg, text_width=found["text_width"], before_start=lambda: write_config(cfg))
    with open_url(join(run_dir(cfg.output_root, cfg.run), "summary.json"), "rb") as f:
        return {**json.loads(f.read()), "run": cfg.run}

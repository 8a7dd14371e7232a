"""One training worker's whole job, shared by the local run (`pixart train`) and each Ray Train worker.

    summary = train_worker(cfg)                                   # local: rank 0 of 1
    train_worker(cfg, rank, world, device=dev, strategy=s, ...)   # flows/_ray_train.py, per worker

Resumes from the run's latest checkpoint, trains to schedule.max_steps, logs metrics on rank 0, writes sample
grids every schedule.sample_every steps and at the end, then the loss curve and the cost summary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pixart.train.config import TrainConfig
from pixart.train.monitor import MetricsLog
from pixart.train.sharding import Strategy
from pixart.train.trainer import Trainer


def train_worker(cfg: TrainConfig, rank: int = 0, world_size: int = 1, *, device: torch.device | None = None,
                 strategy: Strategy | None = None,
                 all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 report: Callable[[dict[str, Any]], None] | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None,
                 trainer: Trainer | None = None, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train one worker to the end; returns the summary (rank 0) or the last metrics. `strategy`: one process, DDP
    or FSDP (pixart/train/sharding.py). `report` is called on every rank at the same steps (Ray requires that);
    `progress` on rank 0 after each logged step. `trainer`: one already built and resumed (the local run builds it
    before writing anything); `say`: rank 0's notes (a changed lr).

    metrics.jsonl is flushed before each checkpoint is saved, so a committed checkpoint's steps are always logged;
    a crash after the flush and before the commit leaves lines past the latest checkpoint, which the resumed run
    drops (`MetricsLog`) and logs again as it redoes those steps."""
    from pixart.train.sampling import save_samples

    if trainer is None:
        trainer = Trainer(cfg, rank, world_size, device=device, strategy=strategy,
                          all_reduce_mean=all_reduce_mean)
        trainer.resume(log=say if rank == 0 else None)
    log = MetricsLog(cfg.output_root, cfg.run, trainer.step) if rank == 0 else None
    sched = cfg.schedule
    last: dict[str, Any] = {"step": trainer.step}
    for metrics in trainer.fit(before_checkpoint=lambda step: log.flush() if log else None):
        last = metrics
        step = metrics["step"]
        if step % sched.log_every == 0 or step >= sched.max_steps:
            if log is not None:
                log.append(metrics)
                if progress is not None:
                    progress(metrics)
            if report is not None:
                report(metrics)
        if sched.sample_every and step % sched.sample_every == 0 and step < sched.max_steps:
            save_samples(trainer, step)  # on every rank: FSDP gathers the weights; rank 0 writes
    save_samples(trainer, trainer.step)
    if log is None:
        return last
    return {**log.finish(cfg.stage, cfg.stage_step), "run": cfg.run}

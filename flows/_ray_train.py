"""Ray Train glue: the same `pixart.train.run.train_worker` on N workers under `TorchTrainer` (DDP by default, FSDP2 as
an option: `ray.strategy=fsdp`, `pixart/train/sharding.py`). Each worker streams its own share of the feature shards
(the loader splits by rank), checkpoints go to the run directory under output_root (rank 0), and
`FailureConfig(max_failures)` restarts the worker group after a failure: every worker then resumes from the run's
latest checkpoint. A re-run of the same run name resumes too.

Ray (`flows/_ray.py`): connects to `ray.address`, else RAY_ADDRESS, else starts a local Ray with a capped object
store and no dashboard (the loader reads shards itself, so Ray's object store carries almost nothing).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows._ray import ray_session
from pixart.train.config import TrainConfig
from pixart.train.prepare import check_features, prepare_conditions
from storage.errors import PipelineError
from storage.urls import absolute_url, filesystem, protocol_of


def _loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: `train_worker` with this worker's rank, device and strategy."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from pixart.train.run import train_worker
    from pixart.train.sharding import FSDP, Replicated

    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def mean(x: torch.Tensor) -> torch.Tensor:
        if world > 1 and dist.is_initialized():
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x = x / world
        return x

    if world > 1 and cfg.ray.strategy == "fsdp":
        strategy = FSDP()  # sharded in place; the Trainer gathers the shards for checkpoints and samples
    else:  # DDP over the workers (one worker: the model moved to its device)
        strategy = Replicated(wrap=lambda model: ray.train.torch.prepare_model(
            model, parallel_strategy="ddp" if world > 1 else None))
    train_worker(cfg, rank, world, device=ray.train.torch.get_device(), strategy=strategy, all_reduce_mean=mean,
                 report=ray.train.report, say=print)


def encode_conditions(cfg: TrainConfig, text_width: int | None) -> None:
    """`prepare_conditions` as a Ray task: on a GPU worker when the run uses GPUs, so the driver never loads T5."""
    import ray

    task = ray.remote(num_gpus=1 if cfg.ray.use_gpu else 0, max_retries=0)(prepare_conditions)
    try:
        ray.get(task.remote(cfg, text_width))
    except ray.exceptions.RayTaskError as e:  # the task's own error (a ConfigError on a width mismatch)
        if isinstance(e.cause, Exception):
            raise e.cause from None
        raise


def run_ray(cfg: TrainConfig, *, text_width: int | None = None,
            before_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the stage on Ray Train; returns the final metrics. The run's conditions (null caption, sample prompts)
    are encoded first in a Ray task unless already stored (`text_width`: the features', checked against the T5;
    read from the features when not given); `before_start()` runs after that, before the workers start (the
    driver writes the run's config.yaml there).
    A worker's own PipelineError that ends the run is raised as itself (one line for the CLI)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # the workers run in another directory: relative local paths (the root, an init that exists here) made absolute
    init = absolute_url(cfg.init) if cfg.init and os.path.exists(cfg.init) else cfg.init
    cfg = cfg.model_copy(update={"output_root": absolute_url(cfg.output_root), "init": init})
    with ray_session(cfg.ray.address, object_store_memory=cfg.ray.object_store_memory,
                     include_dashboard=cfg.ray.include_dashboard, num_cpus=max(2, os.cpu_count() or 2),
                     log_to_driver=True):
        encode_conditions(cfg, check_features(cfg)["text_width"] if text_width is None else text_width)
        if before_start is not None:
            before_start()
        fs, path = filesystem(cfg.output_root)
        storage = str(Path(path, "runs", cfg.run, "ray").resolve()) if protocol_of(fs) in ("file", "local") else None
        trainer = TorchTrainer(
            _loop,
            train_loop_config={"cfg": cfg.model_dump(mode="json")},
            scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                         resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
            run_config=RunConfig(name=cfg.run, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
        )
        try:
            result = trainer.fit()
        except Exception as e:
            cause = e.__cause__
            cause = getattr(cause, "cause", cause)  # RayTaskError wraps the worker's exception
            if isinstance(cause, PipelineError):
                raise cause from None
            raise
        return dict(result.metrics or {})

"""The Prefect side of the stage kit: shard calls become Prefect tasks, progress and summaries become artifacts.

Each shard is one task run named `<stage>-<shard>` with up to 2 retries, for transient errors only
(`storage.errors.is_transient`), after the same delays as the local and Ray runners (`_stage.RETRY_DELAYS`): a
missing file or bad config fails the shard at once with its reason.
"""

from __future__ import annotations

import json
import logging
import queue
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from flows._stage import RETRY_DELAYS, Runtime, Stage, StageOutcome, run_stage
from storage.errors import PipelineError, is_transient


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - the failed state re-raises the task's own exception
        return is_transient(e)
    return False


@task(name="shard", task_run_name="{stage_name}-{shard_name}", retries=len(RETRY_DELAYS),
      retry_delay_seconds=list(RETRY_DELAYS),
      retry_condition_fn=_retry_transient, cache_policy=NO_CACHE)
def shard_task(stage_name: str, shard_name: str, call) -> dict[str, Any]:
    return call()


GPU_LIMIT = "pixart-gpu"  # the global concurrency limit of GPU slots: `prefect gcl create pixart-gpu --limit N`


def _on_gpus(slots: int, call):
    """Run `call` holding `slots` of the `pixart-gpu` global concurrency limit (strict: the limit must exist)."""
    from prefect.concurrency.sync import concurrency

    try:
        with concurrency(GPU_LIMIT, occupy=slots, strict=True):
            return call()
    except Exception as e:
        if GPU_LIMIT in str(e) and ("must be created" in str(e) or "not found" in str(e).lower()):
            raise PipelineError(f"no global concurrency limit {GPU_LIMIT!r}: create it with `prefect gcl create "
                                f"{GPU_LIMIT} --limit <GPUs>` (docker/README)") from None
        raise


class PrefectRuntime(Runtime):
    """Shard calls as Prefect tasks (at most `stage.workers` at once), logs to the run logger, UI artifacts."""

    def __init__(self, task_fn=None) -> None:
        self.logger = get_run_logger()
        self.task_fn = task_fn or shard_task
        self.progress_id = None

    def log(self, message: str, level: int = logging.INFO) -> None:
        self.logger.log(level, message)

    def run_shards(self, stage: Stage, cfg, shards, on_done) -> None:
        slots = stage.gpu_slots(cfg)
        pending = list(reversed(shards))
        running = {}
        finished: queue.SimpleQueue = queue.SimpleQueue()  # futures, as they finish: O(1) per shard at any count
        while pending or running:
            while pending and len(running) < max(1, stage.workers):
                shard = pending.pop()
                call = (lambda s: lambda: stage.run_shard(s, cfg, lambda n: None))(shard)
                if slots:  # wait for free GPU slots; a missing limit is an error, not a silent no-op
                    call = (lambda c, n: lambda: _on_gpus(n, c))(call, slots)
                future = self.task_fn.submit(stage.name, shard.name, call)
                running[future] = shard
                future.add_done_callback(finished.put)
            shard = running.pop(future := finished.get())
            try:
                result = future.result()
            except Exception as e:  # noqa: BLE001 - one shard's failure must not stop the others
                on_done(shard, None, e)
            else:
                on_done(shard, result, None)

    def progress(self, fraction: float, text: str) -> None:
        if self.progress_id is None:
            self.progress_id = create_progress_artifact(100.0 * fraction, key=self.key + "-progress",
                                                        description=text)
        else:
            update_progress_artifact(self.progress_id, 100.0 * fraction, description=text)

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        create_table_artifact(rows, key=key, description=description)

    def markdown(self, key: str, text: str, description: str) -> None:
        create_markdown_artifact(text, key=key, description=description)


Redo = Literal["stale", "errors"]  # a stage flow's typed `redo` (StageConfig.redo), an enum in the UI's form


def with_typed(overrides: list[str] | None, typed: dict[str, Any]) -> list[str]:
    """The overrides a stage flow runs with: its typed parameters that were given (`{config key: value}`, dotted for
    nested keys; None keeps the preset's), as `key=value` with the value as JSON (so a caption set named `123` or
    `null` stays a string), then the free-text `overrides`, which win over them."""
    return [*(f"{key}={json.dumps(value)}" for key, value in typed.items() if value is not None), *(overrides or [])]


def run_as_flow(stage: Stage, config: str, overrides: list[str] | None, force: bool, task_fn=None):
    """The body of every stage's Prefect flow: a Completed state with the outcome, or a Failed one with a reason."""
    runtime = PrefectRuntime(task_fn)
    try:
        outcome: StageOutcome = run_stage(stage, config, overrides or [], force, runtime)
    except PipelineError as e:
        runtime.log(str(e), logging.ERROR)
        return Failed(message=str(e))
    data = outcome.counts()
    if not outcome.ok:  # failed shards, or shards another run still holds: not a complete run
        return Failed(message=data["message"])
    return Completed(message=data["message"], data=data)

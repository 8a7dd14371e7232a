"""The stage skeleton every flow shares, free of Prefect so that local CLI runs start in about a second.

A stage says what is its own (`Stage`: load its config, list pending shards, run one shard, summarise); this
module does the rest the same way for every stage: config and error mapping, the pending list, retries of
transient errors only, busy shards (leased by another run), progress, the summary and its artifacts.

A run is complete only when every shard is committed: a shard that failed, or that another live run still holds
(busy), makes `StageOutcome.ok` false, so `pixart` exits non-zero and the Prefect flow ends Failed, naming them.

    outcome = run_stage(IngestStage(), "sam", ["source=/data/sa1b"], force=False, runtime=LocalRuntime())

`flows/ingest.py`, `flows/caption.py`, `flows/extract.py` and `flows/train.py` wrap the same call in a Prefect
flow (`flows/_prefect.py` supplies a runtime whose shard calls are Prefect tasks with retries and whose artifacts
go to the Prefect UI); `pixart` runs it with `LocalRuntime`, which never starts a Prefect server.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from storage.commit import write_atomic
from storage.configio import dump_yaml
from storage.errors import PipelineError, ShardBusyError, is_transient, one_line
from storage.urls import describe_error, join

RETRY_DELAYS = (5.0, 30.0)  # seconds before the 1st and 2nd retry of a transient shard failure


@dataclass
class Shard:
    """One unit of work as the runner sees it: a name and whatever the stage needs to run it."""

    name: str
    item: Any
    why: str = ""  # why it is pending: "missing", "stale: <reason>", "forced"


@dataclass
class StageOutcome:
    """What a run did: per-shard results, failures with reasons, and shards another run is working on.

    `total` counts the shards handed to the run; `committed_before` those the stage left out as already committed
    (a stage that lists only pending shards), so a re-run can say how many shards there are in all."""

    stage: str
    dataset: str
    total: int
    results: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    busy: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    committed_before: int = 0

    @property
    def ok(self) -> bool:
        """Every shard is committed: none failed, none left to another run."""
        return not self.failed and not self.busy

    def counts(self) -> dict[str, Any]:
        skipped = sum(bool(r.get("skipped")) for r in self.results)
        return {"stage": self.stage, "dataset": self.dataset, "shards": self.total, "done": len(self.results),
                "skipped": skipped, "failed": sorted(self.failed), "busy": sorted(self.busy),
                "all_shards": self.total + self.committed_before, "committed": self.committed_before + skipped,
                "to_run": self.total - skipped,
                "num_ok": sum(r["num_ok"] for r in self.results),
                "num_error": sum(r["num_error"] for r in self.results), **self.extra}


class Stage:
    """What one stage supplies. `run_shard` must be retry-safe (committed output skipped, done marker last)."""

    name = ""
    workers = 1
    committed_before = 0  # set by `shards` when it leaves already committed shards out

    def load(self, config: str, overrides: list[str]) -> Any:
        raise NotImplementedError

    def output_dir(self, cfg: Any) -> str:
        raise NotImplementedError

    def shards(self, cfg: Any, log: Callable[[str], None]) -> list[Shard]:
        raise NotImplementedError

    def open(self, cfg: Any) -> None:
        """Load what every shard shares (a model, a process pool); raise PipelineError when that fails."""

    def close(self) -> None:
        pass

    def run_shard(self, shard: Shard, cfg: Any, progress: Callable[[int], None]) -> dict[str, Any]:
        raise NotImplementedError

    def gpu_slots(self, cfg: Any) -> int:
        """GPUs one shard call holds. Under Prefect each call then waits for that many slots of the `pixart-gpu`
        global concurrency limit, so stages sharing a cluster never oversubscribe its GPUs."""
        return 0

    def ray_pipelines(self, cfg: Any, shards: list[Shard]) -> list:
        """The stage's Ray Data pipelines (`flows._ray_stage.RayPipeline`), for executor=ray."""
        raise PipelineError(f"{self.name} has no Ray executor")

    def run_all(self, cfg: Any, shards: list[Shard], runtime: Runtime, on_done) -> None:
        """Run every pending shard: on the runtime's executor (local threads or Prefect tasks), or, with
        executor=ray, through the one Ray Data runtime (`flows/_ray_stage.py`) fed by `ray_pipelines`."""
        if getattr(cfg, "executor", "local") != "ray":
            return runtime.run_shards(self, cfg, shards, on_done)
        from flows._ray_stage import run_on_ray

        by_name = {s.name: s for s in shards}
        failed = run_on_ray(self.ray_pipelines(cfg, shards), cfg.ray.address,
                            lambda name, result: on_done(by_name[name], result, None),
                            delays=getattr(runtime, "retry_delays", RETRY_DELAYS), log=runtime.log)
        for name, err in failed.items():  # a ShardBusyError counts the shard as busy: the run is then incomplete
            on_done(by_name[name], None, err)

    def finish(self, cfg: Any, outcome: StageOutcome, runtime: Runtime) -> str:
        """After every shard: dataset-wide steps, artifacts; returns the one-line message (the failures first)."""
        if not outcome.ok:
            return failure_message(outcome)
        return f"{outcome.counts()['num_ok']} ok, {outcome.counts()['num_error']} error rows"


# ---------------------------------------------------------------------------------------------------------------------
# Runtimes: where shard calls run and where progress, logs and artifacts go
# ---------------------------------------------------------------------------------------------------------------------


class Runtime:
    key = ""  # artifact key prefix, `<stage>-<dataset>`

    def log(self, message: str, level: int = logging.INFO) -> None:
        raise NotImplementedError

    def run_shards(self, stage: Stage, cfg: Any, shards: list[Shard],
                   on_done: Callable[[Shard, dict | None, BaseException | None], None]) -> None:
        raise NotImplementedError

    def progress(self, fraction: float, text: str) -> None:
        pass

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        pass

    def markdown(self, key: str, text: str, description: str) -> None:
        pass


def call_with_retries(fn: Callable[[], dict], delays=RETRY_DELAYS, log=None, name: str = "") -> dict:
    """Run `fn`; retry only transient errors (network, throttling, a killed worker, a busy lease)."""
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == len(delays) or not is_transient(e):
                raise
            if log is not None:
                log(f"{name}: {one_line(e)}; retrying in {delays[attempt]:.0f} s", logging.WARNING)
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


class _BarSafeHandler(logging.Handler):
    """Log lines to the current sys.stderr through `tqdm.write`, which clears an active progress bar's line first
    and redraws the bar after, so a line never prints over the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


class LocalRuntime(Runtime):
    """In-process threads, stderr logging, a tqdm bar; artifacts are the summary files saved beside the outputs."""

    def __init__(self, retry_delays=None) -> None:
        self.retry_delays = RETRY_DELAYS if retry_delays is None else retry_delays
        self.logger = logging.getLogger("pixart")
        if not self.logger.handlers:
            handler = _BarSafeHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
            self.logger.addHandler(handler)
            self.logger.setLevel(logging.INFO)
            self.logger.propagate = False

    def log(self, message: str, level: int = logging.INFO) -> None:
        self.logger.log(level, message)

    def run_shards(self, stage, cfg, shards, on_done) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(shards), unit="shard", desc=f"{stage.name} {getattr(cfg, 'dataset', '')}",
                   disable=None)
        images = {"n": 0}

        def progress(n: int) -> None:
            images["n"] += n
            bar.set_postfix(samples=images["n"], refresh=False)

        def call(shard: Shard) -> dict:
            return call_with_retries(lambda: stage.run_shard(shard, cfg, progress), self.retry_delays, self.log,
                                     shard.name)

        with ThreadPoolExecutor(max_workers=max(1, stage.workers), thread_name_prefix="shard") as pool:
            todo = list(reversed(shards))
            running: dict[Future, Shard] = {}
            while todo or running:
                while todo and len(running) < max(1, stage.workers):
                    shard = todo.pop()
                    running[pool.submit(call, shard)] = shard
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    shard = running.pop(future)
                    err = future.exception()
                    on_done(shard, None if err else future.result(), err)
                    bar.update(1)
        bar.close()


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def run_stage(stage: Stage, config: str, overrides: list[str], force: bool, runtime: Runtime) -> StageOutcome:
    """Load config, list shards, run the pending ones, summarise. Raises PipelineError for a run that cannot start
    (bad config, missing source, unusable output root, unloadable model); shard failures are in the outcome."""
    where = config
    try:
        cfg = stage.load(config, list(overrides) + (["force=true"] if force else []))
        where = getattr(cfg, "source", None) or cfg.output_root
        shards = stage.shards(cfg, runtime.log)
        if getattr(cfg, "shards", None):  # shards=[...]: only these (by input shard name)
            wanted = set(cfg.shards)
            shards = [s for s in shards if s.name in wanted or (s.name.startswith(("text-", "latents-"))
                                                                and s.name.split("-", 1)[1] in wanted)]
        where = cfg.output_root
        if shards:
            stage.open(cfg)  # before anything is written: a model that cannot load leaves no empty folders
        write_atomic(join(stage.output_dir(cfg), "config.resolved.yaml"), dump_yaml(cfg).encode())
    except OSError as e:
        stage.close()
        raise PipelineError(describe_error(where, e)) from None
    except BaseException:
        stage.close()
        raise
    outcome = StageOutcome(stage=stage.name, dataset=getattr(cfg, "dataset", ""), total=len(shards),
                           committed_before=stage.committed_before)
    runtime.key = f"{stage.name}-{outcome.dataset}".lower()
    runtime.log(f"{stage.name} {outcome.dataset}: {len(shards)} shards -> {stage.output_dir(cfg)}")
    start = time.perf_counter()

    reported: set[str] = set()
    # progress (an API call under Prefect): on a new percent at most once a second, else every 2 s, and at the end
    tally = {"samples": 0, "percent": -1, "at": 0.0}
    # A done shard gets its own log line in runs of up to QUIET_AFTER shards; above that (thousands of lines in the
    # run's logs, one database row each under Prefect) the progress line stands for them, at most every 2 s, and the
    # per-shard table keeps every shard. Failed and busy shards are always logged.
    ok_level = logging.INFO if len(shards) <= QUIET_AFTER else logging.DEBUG

    def on_done(shard: Shard, result: dict | None, err: BaseException | None) -> None:
        reported.add(shard.name)
        if err is None:
            outcome.results.append(result)
            if not result.get("skipped"):
                tally["samples"] += result["num_ok"] + result["num_error"]
            redone = (result.get("stats") or {}).get("redone")
            runtime.log(f"{shard.name}: {result['num_ok']} ok, {result['num_error']} errors"
                        + (" (already committed)" if result.get("skipped") else "")
                        + (f" (redone: {redone})" if redone and not result.get("skipped") else ""), ok_level)
        elif isinstance(err, ShardBusyError):
            outcome.busy[shard.name] = one_line(err)
            runtime.log(f"{shard.name}: {one_line(err)}", logging.WARNING)
        else:
            outcome.failed[shard.name] = one_line(err)
            runtime.log(f"{shard.name} failed{' after retries' if is_transient(err) else ''}: {one_line(err)}",
                        logging.ERROR)
        done = len(outcome.results) + len(outcome.failed) + len(outcome.busy)
        now = time.perf_counter()
        percent = 100 * done // max(1, len(shards))
        since = now - tally["at"]
        if (percent != tally["percent"] and since >= 1.0) or since > 2.0 or done == len(shards):
            tally.update(percent=percent, at=now)
            rate = tally["samples"] / max(1e-9, now - start)
            text = f"{done}/{len(shards)} shards, {rate:.1f} samples/s"
            runtime.progress(done / max(1, len(shards)), text)
            if ok_level != logging.INFO:
                runtime.log(f"{stage.name} {outcome.dataset}: {text}, {len(outcome.failed)} failed, "
                            f"{len(outcome.busy)} busy")

    try:
        if shards:
            stage.run_all(cfg, shards, runtime, on_done)
    finally:
        stage.close()
    for shard in shards:  # an executor that ended without a word about a shard must not pass for complete
        if shard.name not in reported:
            on_done(shard, None, PipelineError("the executor ended without a result for this shard"))
    runtime.table(f"{runtime.key}-shards", shard_table(outcome), f"{stage.name} {outcome.dataset}: one row per shard")
    message = stage.finish(cfg, outcome, runtime)
    outcome.extra["message"] = message
    return outcome


QUIET_AFTER = 100  # shards: above this, done shards are logged at DEBUG and the progress line is logged instead

SHARD_COLUMNS = ("num_ok", "num_error", "resumed_rows", "bytes", "seconds")


def shard_table(outcome: StageOutcome) -> list[dict[str, Any]]:
    """One row per shard of the run, whichever executor ran it (local threads, Prefect tasks, Ray): its state
    (done, skipped, redone and why, failed, busy) and counts. The Prefect runtime publishes it as an artifact."""
    rows = []
    for r in outcome.results:
        state = "skipped" if r.get("skipped") else ("redone" if (r.get("stats") or {}).get("redone") else "done")
        reason = (r.get("stats") or {}).get("redone", "")
        rows.append({"shard": r["shard"], "state": state, **{c: r.get(c) for c in SHARD_COLUMNS},
                     "output": r.get("output_url"), "reason": reason})
    for state, shards in (("failed", outcome.failed), ("busy", outcome.busy)):
        rows += [{"shard": name, "state": state, **dict.fromkeys(SHARD_COLUMNS), "output": None, "reason": why}
                 for name, why in shards.items()]
    return sorted(rows, key=lambda row: row["shard"])


def local_gpus(cfg: Any) -> int:
    """1 when a stage's shard calls run here (executor=local) on a GPU (device cuda, or auto with one), else 0:
    with executor=ray, Ray's resources place the GPU work instead."""
    if getattr(cfg, "executor", "local") != "local" or getattr(cfg, "device", "cpu") == "cpu":
        return 0
    import torch

    return 1 if torch.cuda.is_available() else 0


def manifests_to_read(cfg: Any) -> list[str]:
    """The committed manifests a downstream stage reads (first `max_shards`), after checking the output root."""
    from storage.manifest import committed_manifests, manifest_dir
    from storage.urls import check_output_root

    manifests = committed_manifests(cfg.output_root, cfg.dataset)[: cfg.max_shards]
    if not manifests:
        raise PipelineError(f"no committed manifests under {manifest_dir(cfg.output_root, cfg.dataset)}: "
                            f"run `pixart ingest {cfg.dataset}` first")
    check_output_root(cfg.output_root, cfg.create_bucket)
    return manifests


INCOMPLETE = "incomplete:"  # how a run's message starts when all it lacks are shards another live run holds


def failure_message(outcome: StageOutcome) -> str:
    """The run's message when it is not complete: the failed shards with reasons, then the busy ones."""
    parts = []
    if outcome.failed:
        reasons = "; ".join(f"{k}: {v}" for k, v in sorted(outcome.failed.items())[:5])
        parts.append(f"{len(outcome.failed)} of {outcome.total} shards failed: {reasons}")
    if outcome.busy:
        parts.append(f"{INCOMPLETE} {len(outcome.busy)} of {outcome.total} shards are being processed by another "
                     f"run, not done here: {', '.join(sorted(outcome.busy))}")
    return "; ".join(parts)

"""Orchestration overhead of the stage kit under Prefect: N no-op shards through `run_as_flow` (one Prefect task per
shard, retries, progress artifact, per-shard table), run as a subflow of a parent flow the way `pixart-pipeline` runs
a step, against bare Prefect tasks mapped the same way, in the same run, on one temporary local Prefect server
(SQLite).

    python benchmarks/bench_orchestration.py --shards 10000 --workers 8

Prints ms per shard for both, the ratio (ours / bare; the target is at most 1.5x) and how many times the client or
the server logged "database is locked" (the target is none).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.testing.utilities import prefect_test_harness


@task(name="noop")
def noop(i: int) -> dict:
    return {"shard": str(i), "num_ok": 1, "num_error": 0}


@contextmanager
def stderr_captured():
    """fd 2 (this process and the server subprocess it starts) into a temporary file; yields a function that reads
    what was captured."""
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            yield lambda: (out.seek(0), out.read())[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def drain(quiet_s: float = 5.0, limit_s: float = 600.0) -> float:
    """Wait until the server has recorded every task run the last run reported (its task-run count unchanged for
    `quiet_s`), so that the next run starts on an idle server, as the first one did; returns the seconds waited.
    The local server records task runs from events, after the flow returns, and a next run that starts while it
    writes that backlog to SQLite meets "database is locked"."""
    from prefect.settings import PREFECT_API_URL

    count = urllib.request.Request(f"{PREFECT_API_URL.value()}/task_runs/count", data=b"{}", method="POST",
                                   headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    last, since = -1, start
    while time.perf_counter() - start < limit_s:
        with urllib.request.urlopen(count, timeout=30) as r:
            n = int(r.read())
        if n != last:
            last, since = n, time.perf_counter()
        elif time.perf_counter() - since >= quiet_s:
            break
        time.sleep(0.5)
    return time.perf_counter() - start - quiet_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=8, help="tasks in flight at once, on both sides")
    ap.add_argument("--log", help="save the client's and the server's log here")
    args = ap.parse_args()
    logging.getLogger("prefect").setLevel(logging.WARNING)

    from flows._prefect import run_as_flow
    from flows._stage import Shard, Stage

    class Noop(Stage):
        name = "noop"
        workers = args.workers

        def load(self, config, overrides):
            from storage.config import StageConfig

            return StageConfig(output_root=str(Path("/tmp") / "bench-orchestration"))

        def output_dir(self, cfg):
            return cfg.output_root

        def shards(self, cfg, log):
            return [Shard(f"s{i:06d}", i) for i in range(args.shards)]

        def run_shard(self, shard, cfg, progress):
            return {"shard": shard.name, "num_ok": 1, "num_error": 0}

    @flow(name="bare", task_runner=ThreadPoolTaskRunner(max_workers=args.workers))
    def bare():
        return len([f.result() for f in noop.map(range(args.shards))])

    @flow(name="noop-stage", task_runner=ThreadPoolTaskRunner(max_workers=args.workers))
    def stage_flow():
        return run_as_flow(Noop(), "", [], False)

    @flow(name="pipeline")
    def kit():  # as `pixart-pipeline` runs a step: the stage's flow as a subflow
        return stage_flow()

    os.environ["PREFECT_API_LOG_RETRYABLE_ERRORS"] = "true"  # the server logs why it answered 503 (a locked database)
    times, failed, drained, locked, seen = {}, {}, {}, {}, 0  # locked: "database is locked" lines while each ran
    with stderr_captured() as captured, prefect_test_harness():
        for name, fn in (("bare-cold", bare), ("kit", kit), ("bare", bare)):  # bare first to warm the server up
            start = time.perf_counter()
            try:
                state = fn(return_state=True)
            except Exception as e:  # noqa: BLE001 - the server refused the run itself (503 after retries)
                failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
            else:
                if not state.is_completed():
                    failed[name] = str(state.message)[:200]
            times[name] = time.perf_counter() - start
            drained[name] = drain()
            locked[name] = captured().count(b"database is locked") - seen
            seen += locked[name]
        log = captured()
    if args.log:
        Path(args.log).write_bytes(log)
    if failed:
        raise SystemExit(f"runs that did not complete: {failed}; 'database is locked' logged {locked} times")
    per = {k: 1000 * v / args.shards for k, v in times.items()}
    print(f"{args.shards} shards, {args.workers} in flight: bare Prefect tasks {per['bare']:.2f} ms/shard, "
          f"stage kit {per['kit']:.2f} ms/shard, ratio {per['kit'] / per['bare']:.2f}x; "
          f"'database is locked' logged {locked} times; the test server's event bus "
          f"dropped a full queue {log.count(b'Subscription queue is full')} times; the server took "
          + ", ".join(f"{v:.0f} s after {k}" for k, v in drained.items()) + " to record the task runs")


if __name__ == "__main__":
    main()

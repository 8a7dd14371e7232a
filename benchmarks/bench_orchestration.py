"""Orchestration overhead of the stage kit under Prefect: N no-op shards through `run_as_flow` (one Prefect task per
shard, retries, progress artifact, per-shard table) against bare Prefect tasks mapped the same way, in the same run,
on one temporary local Prefect server (SQLite).

    python benchmarks/bench_orchestration.py --shards 10000 --workers 8

Prints ms per shard for both and the ratio (ours / bare); the target is at most 1.5x. Watch the log for
"database is locked": there should be none.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.testing.utilities import prefect_test_harness


@task(name="noop")
def noop(i: int) -> dict:
    return {"shard": str(i), "num_ok": 1, "num_error": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=8, help="tasks in flight at once, on both sides")
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

    @flow(name="kit", task_runner=ThreadPoolTaskRunner(max_workers=args.workers))
    def kit():
        return run_as_flow(Noop(), "", [], False)

    with prefect_test_harness():
        times = {}
        for name, fn in (("bare", bare), ("kit", kit), ("bare", bare)):  # bare twice: warm server both ways
            start = time.perf_counter()
            state = fn(return_state=True)
            assert state.is_completed(), state.message
            times[name] = time.perf_counter() - start
    per = {k: 1000 * v / args.shards for k, v in times.items()}
    print(f"{args.shards} shards, {args.workers} in flight: bare Prefect tasks {per['bare']:.2f} ms/shard, "
          f"stage kit {per['kit']:.2f} ms/shard, ratio {per['kit'] / per['bare']:.2f}x")


if __name__ == "__main__":
    main()

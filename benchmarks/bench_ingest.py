"""Throughput of SA-1B ingest (`storage.ingest.shard.ingest_shard`) against reading the same tars with `tarfile` alone.

Builds SA-1B-format shards (`sa_NNNNNN.tar` with `sa_<id>.jpg` + `sa_<id>.json`, short side 1500 px like the real
data) in a temp dir, warms the page cache, then times, interleaved and --repeats times each:

    raw r:         tarfile.open(mode="r:")  (seekable) - iterate members, read every member's bytes
    raw r|         tarfile.open(mode="r|")  (streaming) - the same
    ingest header  ingest_shard with the default settings (decode.verify="header", hash=xxh3_128): parse, hash,
                   probe, write the manifest
    ingest header x2 threads    the same, two shards at a time in threads (worker_type=thread, workers=2)
    ingest header x2 procs      two shards at a time in worker processes (the flow's default, workers=2)
    ingest sha256 x2 procs      the default with hash=sha256 (the manifest also carries sha256)
    ingest full    ingest_shard with decode.verify="full" (JPEG pixels decoded at 1/8 scale)
    sha256 only / xxh3 only     hashing the same bytes and nothing else

The faster raw mode is the baseline; each row shows images/s, MB/s (tar bytes) and its time ratio to the baseline
(baseline time / row time: 1.0 = as fast as the raw read). The goal checked at the end: the default settings
(x2 procs) reach at least 0.6.
Timings use the best of the repeats (the median is shown too). Nothing is asserted: this is a script, not a test.

    .venv/bin/python benchmarks/bench_ingest.py [--images N] [--shards N] [--short-side 1500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from storage.config import DecodeConfig
from storage.hashing import content_hash
from storage.ingest.config import IngestConfig
from storage.ingest.samples import photo_variants, write_sa1b_tar
from storage.ingest.shard import ShardResult, ingest_shard, ingest_shard_record, list_shards

GOAL = 0.6  # ingest with default settings must reach this fraction of the raw tarfile read's throughput


def build_shards(root: Path, images: int, shards: int, short_side: int) -> list[Path]:
    """`shards` SA-1B tars holding `images` images in all (the 9 distinct photo/crop variants, cycled)."""
    distinct = photo_variants(min(images, 9), short_side)  # photo_variants repeats with period 9; reuse them
    photos = [distinct[i % len(distinct)] for i in range(images)]
    per = -(-images // shards)
    paths = []
    for s in range(shards):
        chunk = photos[s * per:(s + 1) * per]
        if chunk:
            paths.append(root / f"sa_{s:06d}.tar")
            write_sa1b_tar(paths[-1], chunk, first_id=226381 + 100_000 * s, seed=s)
    return paths


def raw_read(paths: list[Path], mode: str) -> int:
    """Iterate every member with tarfile alone and read all of its bytes; returns the member count."""
    n = 0
    for p in paths:
        with open(p, "rb") as f, tarfile.open(fileobj=f, mode=mode) as tf:
            for info in tf:
                if info.isreg():
                    tf.extractfile(info).read()
                    n += 1
    return n


def hash_only(paths: list[Path], algorithm: str) -> int:
    """The hash of every tar's bytes and nothing else: the floor under any ingest that hashes each image."""
    for p in paths:
        content_hash(p.read_bytes(), algorithm)
    return 0


def run_ingest(cfg: IngestConfig, pool: Executor | None = None) -> int:
    shards = list_shards(cfg)
    if pool is None:
        results = [ingest_shard(shard, cfg) for shard in shards]
    else:
        results = [ShardResult(**r) for r in pool.map(ingest_shard_record, shards, [cfg] * len(shards))]
    assert not any(r.skipped or r.num_error for r in results), results  # a sanity check, not a timing assertion
    return sum(r.num_ok for r in results)


def measure(cases: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[float]]:
    """Run every case once untimed, then `repeats` rounds, each round running every case (order rotated)."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="images in all (default 64)")
    ap.add_argument("--shards", type=int, default=2, help="tar shards to spread them over (default 2)")
    ap.add_argument("--short-side", type=int, default=1500, help="image short side in px (default 1500, as SA-1B)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per case (default 3)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        src, out = Path(tmp, "sa1b"), Path(tmp, "out")
        src.mkdir()
        t0 = time.perf_counter()
        paths = build_shards(src, args.images, args.shards, args.short_side)
        total = sum(p.stat().st_size for p in paths)
        for p in paths:  # warm the page cache
            p.read_bytes()
        print(f"{args.images} images ({args.short_side} px short side) in {len(paths)} shards, "
              f"{total / 1e6:.1f} MB of tar, built in {time.perf_counter() - t0:.1f} s; "
              f"{args.repeats} interleaved repeats, best time used")

        threads, procs = ThreadPoolExecutor(2), ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))

        def ingest(verify: str, pool: Executor | None = None, algorithm: str = "xxh3_128") -> Callable[[], int]:
            cfg = IngestConfig(dataset="sam", source=str(src), output_root=str(out), force=True,
                               decode=DecodeConfig(verify=verify), hash=algorithm)
            return lambda: run_ingest(cfg, pool)

        cases = {"raw tarfile r:": lambda: raw_read(paths, "r:"), "raw tarfile r|": lambda: raw_read(paths, "r|"),
                 "ingest header": ingest("header"), "ingest header x2 threads": ingest("header", threads),
                 "ingest header x2 procs": ingest("header", procs),
                 "ingest sha256 x2 procs": ingest("header", procs, "sha256"), "ingest full": ingest("full"),
                 "sha256 only": lambda: hash_only(paths, "sha256"), "xxh3 only": lambda: hash_only(paths, "xxh3_128")}
        counts = {name: fn() for name, fn in cases.items()}
        assert counts["raw tarfile r:"] == counts["raw tarfile r|"] == 2 * args.images, counts
        assert counts["ingest header"] == counts["ingest header x2 procs"] == counts["ingest full"] == args.images
        times = measure(cases, max(1, args.repeats))
        threads.shutdown()
        procs.shutdown()

    best = {name: min(ts) for name, ts in times.items()}
    base = min(("raw tarfile r:", "raw tarfile r|"), key=best.get)
    print(f"baseline: {base} (the faster plain tarfile read)\n")
    print(f"{'case':<26}{'best s':>9}{'median s':>10}{'images/s':>10}{'MB/s':>9}{'vs baseline':>13}")
    for name, ts in times.items():
        t = best[name]
        print(f"{name:<26}{t:>9.4f}{statistics.median(ts):>10.4f}{args.images / t:>10.1f}{total / 1e6 / t:>9.1f}"
              f"{best[base] / t:>12.3f}x")
    ratio = best[base] / best["ingest header x2 procs"]
    print(f"ingest ratio (default settings: 2 worker processes, xxh3_128) = {ratio:.3f} x raw read ({base}); "
          f"goal >= {GOAL}: {'MET' if ratio >= GOAL else 'NOT MET'}")
    print("(the hash-only rows are ceilings for one worker: ingest must hash every image it reads)")


if __name__ == "__main__":
    main()

"""Captioning on Ray (`executor=ray`): images/s with 1 and with 2 Captioner replicas, in the same run.

On this CPU machine each replica is the tiny random LLaVA on one core (OMP_NUM_THREADS=1 through the Ray runtime
env, one CPU per actor); on a cluster each replica is one GPU. Throughput is the steady state seen by the driver:
images delivered after the first batch, over the time from the first batch to the last, so model loading and
actor start-up (seconds, paid once per job) do not count. Median of --repeats rounds. Goal (issue 9): 2 replicas
>= 1.7x of 1.

    .venv/bin/python benchmarks/bench_caption_ray.py [--images 192] [--batch-size 8] [--max-new-tokens 64]

On a GPU cluster (one replica per GPU; decoding on the CPUs of the same nodes):

    RAY_ADDRESS=auto pixart caption sam executor=ray ray.num_replicas=8 ray.num_gpus_per_replica=1 \\
        ray.num_cpus_per_decoder=1 batch_size=32 output_root=s3://bucket/pixart
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captioning.config import CaptionConfig  # noqa: E402
from captioning.records import ensure_caption_set  # noqa: E402
from storage.ingest.config import IngestConfig  # noqa: E402
from storage.ingest.samples import photo_variants, write_sa1b_tar  # noqa: E402
from storage.ingest.shard import ingest_shard, list_shards  # noqa: E402
from storage.manifest import committed_manifests  # noqa: E402


def run(root: Path, model: str, t5: str, replicas: int, args: argparse.Namespace) -> tuple[float, int]:
    """Caption every shard under `root` with `replicas` actors; returns (steady-state images/s, images)."""
    from flows._ray_stage import run_on_ray
    from flows._stage import Shard
    from flows.caption_stage import CaptionStage

    cfg = CaptionConfig(dataset="sam", output_root=str(root), model=model, t5_tokenizer=t5, force=True,
                        batch_size=args.batch_size, generation={"max_new_tokens": args.max_new_tokens},
                        caption_set=f"bench-{replicas}", executor="ray",
                        ray={"num_replicas": replicas, "num_gpus_per_replica": 0, "num_cpus_per_decoder": 0.5})
    ensure_caption_set(cfg)
    arrivals: list[tuple[float, int]] = []
    shards = [Shard(u.rsplit("/", 1)[-1][:-8], u) for u in committed_manifests(str(root), "sam")]
    pipeline = CaptionStage().ray_pipelines(cfg, shards)[0]
    real = pipeline.accept

    def timed(shard, rows):  # the driver sees each batch's rows of a shard once: record when and how many
        arrivals.append((time.perf_counter(), len(rows)))
        return real(shard, rows)

    pipeline.accept = timed
    failed = run_on_ray([pipeline], None, lambda name, result: None)
    if failed:
        raise SystemExit(f"shards failed: {json.dumps(failed)}")
    # from the first delivered batch to the last: replicas start together, so this leaves out start-up only
    images = sum(n for _, n in arrivals[1:])
    return images / (arrivals[-1][0] - arrivals[0][0]), sum(n for _, n in arrivals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import ray

    from captioning.tiny import make_tiny_llava, make_tiny_t5_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_caption_ray_") as tmp:
        tmp = Path(tmp)
        model, t5 = make_tiny_llava(tmp / "tiny-llava"), make_tiny_t5_tokenizer(tmp / "tiny-t5")
        photos = photo_variants(min(args.images, 9), args.short_side)
        per = -(-args.images // args.shards)
        (tmp / "sa1b").mkdir()
        for s in range(args.shards):
            chunk = [photos[i % len(photos)] for i in range(s * per, min(args.images, (s + 1) * per))]
            write_sa1b_tar(tmp / "sa1b" / f"sa_{s:06d}.tar", chunk, first_id=1 + 100_000 * s, seed=s)
        icfg = IngestConfig(dataset="sam", source=str(tmp / "sa1b"), output_root=str(tmp / "out"))
        for shard in list_shards(icfg):
            ingest_shard(shard, icfg)
        # 3 logical CPUs on 2 cores: one per replica plus room for the decode tasks (replicas taking every CPU
        # would leave the decode tasks unschedulable)
        ray.init(num_cpus=3, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
        try:
            rates: dict[int, list[float]] = {1: [], 2: []}
            for r in range(args.repeats):
                for replicas in ((1, 2) if r % 2 == 0 else (2, 1)):
                    rates[replicas].append(run(tmp / "out", model, t5, replicas, args)[0])
        finally:
            ray.shutdown()
    best = {k: statistics.median(v) for k, v in rates.items()}
    print(f"tiny random LLaVA, {args.images} images in {args.shards} shards, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens; CPU replicas, 1 thread each; median of {args.repeats}")
    for k, v in rates.items():
        rounds = ", ".join(f"{x:.2f}" for x in v)
        print(f"{k} replica{'s' if k > 1 else ' '}  {best[k]:8.2f} images/s   rounds: {rounds}")
    ratio = best[2] / best[1]
    print(f"\n2 replicas / 1: {ratio:.2f}x (goal >= 1.7x: {'MET' if ratio >= 1.7 else 'NOT MET'})")


if __name__ == "__main__":
    main()

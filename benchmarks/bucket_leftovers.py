"""How many samples the bucketed loader never serves over a few epochs, with each bucket's leftovers (partial
batches at an epoch's end) dropped, as the loader did, and carried into the next epoch, as it does now and as the
official AspectRatioBatchSampler does (issue 18, item 7). CPU only, no tars: the loader's own planning code
(`BucketedLoader.plan`) runs on synthetic index rows.

    .venv/bin/python benchmarks/bucket_leftovers.py      # 1M samples in 1000 shards, 64 ranks x 1 stream, batch 12
    .venv/bin/python benchmarks/bucket_leftovers.py --workers 4   # 4 DataLoader workers (streams) per rank
    .venv/bin/python benchmarks/bucket_leftovers.py --samples 4000000 --shard-size 4000

Dataset. --samples images in shards of --shard-size (in random order, so every shard has the dataset's mix), each
given an aspect ratio h/w from one of two mixes and a bucket of the 1024 table by the project's rule (the nearest
key, ratios outside 0.25-4 clamped: `pixart.buckets.assign`; checked on the distinct ratios):

    mixed   stage 3's data (JourneyDB, Midjourney images whose --ar users choose, default 1:1, plus high-aesthetic
            photos): the common formats 1:1, 3:2, 2:3, 4:3, 3:4, 16:9, 9:16, 5:4, 4:5, 7:4, 4:7, 2:1, 1:2, 21:9, 3:1,
            1:3, 4:1, 1:4 with the weights below, plus 10 % free crops, log(h/w) ~ N(-0.15, 0.45)
    sa1b    SA-1B as released (short side 1500, originals about 3300 x 4950): mostly 2:3 landscape, then 3:4,
            portraits 3:2 and 4:3, plus 6 % free crops, log(h/w) ~ N(-0.2, 0.3)

The weights are an estimate, not a measurement: no aspect-ratio histogram of JourneyDB or SA-1B is published
(../shared/reference/formats.md). They give what matters here, a few large buckets and a long tail of rare ones;
the script prints the histogram it used.

Split and plan: the loader's, --ranks x --workers streams (shard i to rank i mod ranks, a rank's shards dealt to its
workers in turn; the trainer reads one stream per rank, the default here), batch --batch (12: stage3-1024's
data.batch_size). "Never seen" counts the samples in no planned batch of epochs 0..--epochs-1 on any rank. What a
trainer then trains, the rank's batches taken from its streams in turn as a DataLoader delivers them: "each epoch's
min" is trainer.py's rule (`pixart.train.state.EpochSteps`: every rank stops epoch e at the min over ranks of
batches_per_rank(epoch=e)); "cut at epoch 0's min" is the rule it had before, every epoch stopped at epoch 0's
count, cutting the batches that carried leftovers complete. "Rows repeating a key": planned rows whose
key is already in their batch (a bucket with fewer than a batch per stream collects its samples over epochs, as
the official sampler does). Each planned epoch's batch count is checked against `batches_in_epoch` (what
`batches_per_rank` sums).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter

import numpy as np

from pixart.buckets import assign, bucket_table

# (h/w, weight): the formats of each mix; the rest of the weight goes to free crops (TAILS)
from pixart.data.index import Entry, FeatureShard
from pixart.data.loader import BucketedLoader, batches_in_epoch

MIXES = {
    "mixed": [(1.0, 0.28), (2 / 3, 0.13), (3 / 2, 0.10), (3 / 4, 0.11), (4 / 3, 0.07), (9 / 16, 0.09), (16 / 9, 0.04),
              (4 / 5, 0.02), (5 / 4, 0.03), (4 / 7, 0.01), (7 / 4, 0.01), (1 / 2, 0.01), (2.0, 0.005),
              (9 / 21, 0.004), (1 / 3, 0.002), (3.0, 0.001), (1 / 4, 0.0005), (4.0, 0.0005)],
    "sa1b": [(2 / 3, 0.62), (3 / 4, 0.14), (3 / 2, 0.12), (4 / 3, 0.06)],
}
TAILS = {"mixed": (-0.15, 0.45), "sa1b": (-0.2, 0.3)}


def bucket_of_ratios(ratios: np.ndarray) -> np.ndarray:
    """The 1024 bucket key of an image of h/w about each ratio (h = round(4096 ratio), w = 4096): the nearest key,
    the first on a tie (ratios beyond 0.25-4 land in the end buckets), as `pixart.buckets.assign` picks it."""
    keys = list(bucket_table(1024))
    values = np.array([float(k) for k in keys])
    heights = np.maximum(1, np.round(ratios * 4096)).astype(np.int64)
    index = np.abs(values[None, :] - (heights / 4096)[:, None]).argmin(1)
    rng = np.random.default_rng(1)
    for i in rng.choice(len(ratios), size=min(2000, len(ratios)), replace=False):  # the project's own rule agrees
        assert assign(int(heights[i]), 4096, 1024).key == keys[index[i]], ratios[i]
    for r, _ in MIXES["mixed"] + MIXES["sa1b"]:
        h = max(1, round(r * 4096))
        assert assign(h, 4096, 1024).key == keys[int(np.abs(values - h / 4096).argmin())], r
    return np.array(keys, dtype=object)[index]


def make_dataset(mix: str, samples: int, shard_size: int, seed: int) -> tuple[list[list[Entry]], Counter]:
    rng = np.random.default_rng(seed)
    formats = MIXES[mix]
    ratios = np.array([r for r, _ in formats])
    weights = np.array([w for _, w in formats])
    tail = 1.0 - weights.sum()
    pick = rng.choice(len(formats) + 1, size=samples, p=np.append(weights, tail))
    mu, sigma = TAILS[mix]
    h_over_w = np.where(pick < len(formats), ratios[np.minimum(pick, len(formats) - 1)],
                        np.exp(rng.normal(mu, sigma, size=samples)))
    buckets = bucket_of_ratios(h_over_w)
    shards = []
    for s in range(math.ceil(samples / shard_size)):
        part = buckets[s * shard_size:(s + 1) * shard_size]
        shards.append([Entry(s, f"{s}/{i}", b, (0, 0), None) for i, b in enumerate(part)])
    return shards, Counter(buckets.tolist())


class Planned(BucketedLoader):
    """The loader's plan over in-memory index rows (`entries`); `carry=False` drops the leftovers at each epoch's
    end, as the loader did before."""

    def __init__(self, entries: list[list[Entry]], *args, carry: bool = True, **kw) -> None:
        super().__init__([FeatureShard(f"s{i:05d}", f"mem://{i}") for i in range(len(entries))], *args, **kw)
        self.rows, self.carry = entries, carry

    def _entries(self, worker: int) -> dict[int, list[Entry]]:
        return {i: self.rows[i] for i in self.stream_shards(worker)}

    def carried(self, worker=0, epoch=None, entries=None):
        return super().carried(worker, epoch, entries) if self.carry else {}


def simulate(entries, args, carry: bool) -> dict:
    n = sum(len(s) for s in entries)
    seen: set[str] = set()
    trained: set[str] = set()
    per_epoch, batches, stream_counts = [], [], {}
    repeats = total = 0  # rows that repeat a key already in their batch (small buckets collected over epochs)
    plans: dict[tuple[int, int], list[list[str]]] = {}
    for epoch in range(args.epochs):
        served = 0
        for rank in range(args.ranks):
            ld = Planned(entries, args.batch, seed=args.seed, rank=rank, world_size=args.ranks,
                         num_workers=args.workers, carry=carry)
            ld.set_epoch(epoch)
            streams = []
            for w in range(args.workers):
                plan = [[e.key for e in b] for b in ld.plan(w)]
                if (rank, w) not in stream_counts:
                    stream_counts[rank, w] = Counter(e.bucket for i in ld.stream_shards(w) for e in entries[i])
                want = batches_in_epoch(stream_counts[rank, w].values(), args.batch, epoch if carry else 0)
                assert len(plan) == want, (rank, w, epoch, len(plan), want)
                streams.append(plan)
                for b in plan:
                    seen.update(b)
                    served += len(b)
                    repeats += len(b) - len(set(b))
            plans[rank, epoch] = list(interleave(streams))
        per_epoch.append(served / n)
        total += served
        batches.append([len(plans[r, epoch]) for r in range(args.ranks)])
    steps = min(batches[0])  # the earlier rule: every epoch cut at epoch 0's min over ranks
    per_epoch_trained: set[str] = set()
    for (_rank, epoch), plan in plans.items():
        for b in plan[:steps]:
            trained.update(b)
        for b in plan[:min(batches[epoch])]:  # trainer.py (EpochSteps): each epoch's own min over ranks
            per_epoch_trained.update(b)
    return {"never": 1 - len(seen) / n, "never_n": n - len(seen), "served": per_epoch, "batches": batches,
            "trainer_never": 1 - len(trained) / n, "steps": steps,
            "per_epoch_never": 1 - len(per_epoch_trained) / n, "per_epoch_steps": [min(b) for b in batches],
            "repeats": repeats / total}


def interleave(streams: list[list[list[str]]]):
    """A rank's batches as iter_rank / a DataLoader deliver them: streams in turn, skipping those that ran out."""
    its = [iter(s) for s in streams]
    turn = list(range(len(its)))
    while turn:
        for w in list(turn):
            b = next(its[w], None)
            if b is None:
                turn.remove(w)
            else:
                yield b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", choices=[*MIXES, "both"], default="both")
    args = ap.parse_args()
    streams = args.ranks * args.workers
    print(f"{args.samples} samples in shards of {args.shard_size}, {args.ranks} ranks x {args.workers} workers = "
          f"{streams} streams, batch {args.batch}, {args.epochs} epochs, 1024 multi-scale buckets")
    rows = []
    for mix in ([*MIXES] if args.mix == "both" else [args.mix]):
        start = time.perf_counter()
        entries, hist = make_dataset(mix, args.samples, args.shard_size, args.seed)
        per_stream = {b: c / streams for b, c in hist.items()}
        top = ", ".join(f"{b} {c / args.samples:.1%}" for b, c in hist.most_common(6))
        rare = sum(1 for v in per_stream.values() if v < args.batch)
        print(f"\n[{mix}] {len(hist)} of 40 buckets used; largest: {top}; {rare} buckets average fewer than "
              f"{args.batch} samples per stream")
        print("  histogram (bucket: share): " + ", ".join(
            f"{b}: {hist[b] / args.samples:.2%}" for b in sorted(hist, key=float)))
        for carry in (False, True):
            r = simulate(entries, args, carry)
            rows.append((mix, "after (carried)" if carry else "before (dropped)", r))
        print(f"  ({time.perf_counter() - start:.0f} s)")
    print(f"\n| mix | leftovers | served per epoch (share of samples) | never seen over {args.epochs} epochs | "
          "batches per rank per epoch (min-max) | earlier trainer, cut at epoch 0's min: steps, never trained | "
          "trainer, each epoch's min: steps, never trained | rows repeating a key in their batch |")
    print("|---|---|---|---|---|---|---|---|")
    for mix, name, r in rows:
        served = " / ".join(f"{s:.2%}" for s in r["served"])
        counts = " / ".join(f"{min(b)}-{max(b)}" for b in r["batches"])
        steps = "/".join(map(str, r["per_epoch_steps"]))
        print(f"| {mix} | {name} | {served} | {r['never']:.3%} ({r['never_n']}) | {counts} | "
              f"{r['steps']}, {r['trainer_never']:.3%} | {steps}, {r['per_epoch_never']:.3%} | {r['repeats']:.3%} |")


if __name__ == "__main__":
    main()

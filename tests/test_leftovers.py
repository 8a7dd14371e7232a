"""Leftovers of the bucketed sampler (issue 18, item 7). The official AspectRatioBatchSampler keeps each bucket's
partial batch and yields it in the next epoch (with drop_last its per-bucket lists are never cleared); the loader
dropped them at every epoch's end, so a bucket with fewer than batch_size samples in a stream was never trained on.
Planned over small synthetic indexes (no tars) with a loader whose `collate` returns the keys alone."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from pixart.data.index import FeatureShard, shard_entries
from pixart.data.loader import BucketedLoader, batches_per_rank
from pixart.features.format import INDEX_SCHEMA
from storage.parquet import write_table

BATCH = 3
# (bucket, samples) per shard: "1.0" common, "0.5" and "2.0" middling, "4.0" rare (fewer than a batch in any stream)
SHARDS = [
    {"1.0": 5, "0.5": 2, "2.0": 1},
    {"1.0": 4, "0.5": 1, "4.0": 1},
    {"1.0": 7, "2.0": 2},
    {"1.0": 3, "0.5": 2, "2.0": 2},
    {"1.0": 6, "4.0": 1},
    {"1.0": 2, "0.5": 4, "2.0": 1},
    {"1.0": 5, "2.0": 2},
    {"1.0": 4, "0.5": 1},
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[FeatureShard]:
    """Latent indexes only (no tars): enough to plan. Keys unique across shards, buckets interleaved in a shard."""
    root = tmp_path_factory.mktemp("leftover-indexes")
    out = []
    for s, spec in enumerate(SHARDS):
        buckets = [b for b, n in spec.items() for _ in range(n)]  # in bucket order: the loader shuffles them
        rows = [{"key": f"k{s}_{i}", "bucket": b, "offset": 512 * i, "bytes": 512, "status": "ok"}
                for i, b in enumerate(buckets)]
        url = str(root / f"shard_{s:02d}.parquet")
        write_table(rows, url, INDEX_SCHEMA)
        out.append(FeatureShard(f"shard_{s:02d}", url))
    return out


class KeysOnly(BucketedLoader):
    """Plans like the loader, reads nothing: each batch is its keys (and its bucket, from the plan)."""

    def collate(self, entries, files):
        assert len({e.bucket for e in entries}) == 1
        return {"keys": [e.key for e in entries], "bucket": entries[0].bucket}


def stream_keys(shards, rank=0, world=1, workers=1) -> dict[str, str]:
    """{key: bucket} of every sample a rank reads (all its streams)."""
    ld = BucketedLoader(shards, BATCH, rank=rank, world_size=world, num_workers=workers)

    return {e.key: e.bucket for w in range(workers) for i in ld.stream_shards(w)
            for e in shard_entries(i, shards[i])}


def epoch_batches(shards, epoch, rank=0, world=1, workers=1, seed=5) -> list[dict]:
    ld = KeysOnly(shards, BATCH, seed=seed, rank=rank, world_size=world, num_workers=workers)
    ld.load_state_dict({"epoch": epoch, "seed": seed, "consumed": {}})  # as the trainer does, epoch by epoch
    return list(ld)


def test_leftovers_are_carried_into_the_next_epoch_and_every_key_is_served(shards):
    """Today: bucket 4.0 (2 samples, batch 3) is never served, and every epoch drops up to 3 x 2 samples. Now the
    samples a bucket holds at an epoch's end (its leftovers: what the epoch took in, carried in plus one pass over
    the stream, less what it served) stay fewer than a batch, are served in the next epoch or carried on, and over
    a few epochs every key is served."""
    keys = stream_keys(shards)
    carried: Counter = Counter()
    served_by_epoch = []
    for epoch in range(4):
        batches = epoch_batches(shards, epoch)
        assert all(len(b["keys"]) == BATCH for b in batches)
        served = Counter(k for b in batches for k in b["keys"])
        took_in = carried + Counter(keys.keys())
        assert not served - took_in, f"epoch {epoch} served keys it neither read nor was handed: {served - took_in}"
        left = took_in - served
        per_bucket = Counter(keys[k] for k in left.elements())
        assert max(per_bucket.values(), default=0) < BATCH, (epoch, per_bucket)  # no full batch held back
        if epoch:
            # last epoch's leftovers come first in their bucket: the bucket's first batch of this epoch opens with them
            for bucket, n in Counter(keys[k] for k in carried.elements()).items():
                first = next((b["keys"] for b in batches if b["bucket"] == bucket), None)
                if first is not None:
                    assert Counter(first[:n]) == Counter(k for k in carried.elements() if keys[k] == bucket)
        served_by_epoch.append(served)
        carried = left
    assert set().union(*served_by_epoch[:2]) == set(keys)  # two epochs: every key, the rare bucket's included
    rare = {k for k, b in keys.items() if b == "4.0"}
    assert rare and rare <= set(served_by_epoch[1])


def test_an_epochs_plan_is_the_same_whatever_ran_before_it(shards):
    """No hidden state: epoch e planned by a fresh loader equals epoch e of a loader that iterated epochs 0..e-1."""
    for workers in (1, 2):
        ld = KeysOnly(shards, BATCH, seed=5, num_workers=workers)
        sequential = []
        for epoch in range(4):
            ld.set_epoch(epoch)
            sequential.append([b["keys"] for b in ld])
        fresh = [[b["keys"] for b in epoch_batches(shards, epoch, workers=workers)] for epoch in range(4)]
        assert sequential == fresh, workers
    other = [[b["keys"] for b in epoch_batches(shards, epoch, seed=6)] for epoch in range(3)]
    assert other != fresh[:3]


def take(shards, state, n, workers) -> tuple[list[list[str]], dict]:
    ld = KeysOnly(shards, BATCH, seed=5, num_workers=workers)
    ld.load_state_dict(json.loads(json.dumps(state)))  # as trainer.json stores it
    taken, batches = [], iter(ld)
    while len(taken) < n and (batch := next(batches, None)) is not None:
        taken.append(batch["keys"])
    return taken, ld.state_dict()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_resume_across_the_epoch_boundary_replays_exactly_the_uninterrupted_run(shards, workers):
    """Stopped anywhere in epochs 0-2 (at an epoch's last batch included) and resumed, epoch after epoch as the
    trainer does: the same batches as the uninterrupted run, leftovers carried into epochs 1 and 2 included."""
    full = [[b["keys"] for b in epoch_batches(shards, epoch, workers=workers)] for epoch in range(3)]
    assert all(full)
    for epoch, batches in enumerate(full):
        for k in sorted({0, 1, len(batches) // 2, len(batches) - 1, len(batches)}):
            head, state = take(shards, {"epoch": epoch, "seed": 5, "consumed": {}}, k, workers)
            rest, _ = take(shards, state, 10 ** 6, workers)
            got = head + rest
            assert state["epoch"] == epoch and got == batches, (epoch, k)
            if k == len(batches) and epoch + 1 < len(full):  # after an epoch's last batch: the next epoch's plan
                after = take(shards, {"epoch": epoch + 1, "seed": 5, "consumed": {}}, 10 ** 6, workers)[0]
                assert after == full[epoch + 1], (epoch, k)


def test_batches_per_rank_counts_each_epochs_batches_exactly_with_leftovers(shards):
    """Every (ranks, workers) up to (4, 2), epochs 0-4: batches_per_rank(epoch=e) is what each rank's loader yields
    in epoch e (so DDP's equal steps hold), epoch 0 has the fewest (what the trainer's steps_per_epoch counts), and
    the batches are one-bucket and full."""
    for world, workers in itertools.product((1, 2, 3, 4), (1, 2)):
        first = batches_per_rank(shards, BATCH, world, num_workers=workers)
        assert first == batches_per_rank(shards, BATCH, world, num_workers=workers, epoch=0)
        assert min(first) > 0, (world, workers, first)
        for epoch in range(5):
            expected = batches_per_rank(shards, BATCH, world, num_workers=workers, epoch=epoch)
            got = [len(epoch_batches(shards, epoch, rank, world, workers)) for rank in range(world)]
            assert got == expected, (world, workers, epoch)
            assert all(g >= f for g, f in zip(got, first, strict=True)), (world, workers, epoch)


def test_without_drop_last_nothing_is_carried(shards):
    """drop_last=False yields the partial batches at the epoch's end: each key exactly once per epoch."""
    keys = stream_keys(shards)
    for epoch in range(3):
        ld = KeysOnly(shards, BATCH, seed=5, drop_last=False)
        ld.set_epoch(epoch)
        assert sorted(k for b in ld for k in b["keys"]) == sorted(keys)


def test_the_trainer_resumes_exactly_across_epochs_that_start_with_carried_leftovers(features, tiny_t5_encoder):
    """tiny-stage3 with batch 3 on the 512-ms features (8 samples: one bucket of 3, five of 1): epochs 0 and 1 have
    one batch, epoch 2 six (the five one-sample buckets complete a batch each from leftovers carried over three
    epochs), and every one is trained: the trainer's steps per epoch are that epoch's batches (`EpochSteps`), not
    epoch 0's count. Stopped at step 2 and resumed from its checkpoint: the same batches and bit-identical losses
    as the uninterrupted run."""
    from pixart.train.config import TrainConfig
    from pixart.train.prepare import prepare_run
    from pixart.train.trainer import Trainer
    from storage.configio import load_config

    def config(run, *extra):
        return load_config(TrainConfig, "tiny-stage3", [f"output_root={features}", f"run={run}",
                                                        "data.caption_set=tiny", f"t5_model={tiny_t5_encoder}",
                                                        "data.batch_size=3", "data.prefetch=0",
                                                        "init_any_step=true", *extra],  # from scratch, deliberately
                           kind="train")

    cfg = config("leftovers-a")
    prepare_run(cfg)
    trainer = Trainer(cfg)
    assert [trainer.epoch_steps(e) for e in range(4)] == [1, 1, 6, 1]
    keys = []
    for batch in trainer.batches():
        keys.append(batch["keys"])
        if len(keys) == 10:
            break
    plans = [[b["keys"] for b in epoch_batches(trainer.loader.shards, e, seed=cfg.data.seed)] for e in range(5)]
    assert [len(p) for p in plans][:4] == [1, 1, 6, 1]
    assert keys == [k for p in plans for k in p][:10]  # epoch 2's six batches all trained
    assert any(len(set(k)) < len(k) for k in keys[:4])  # a bucket of one sample, collected over three epochs
    full = [m["loss"] for m in Trainer(cfg).fit()]
    assert len(full) == 4
    cut = config("leftovers-b", "schedule.max_steps=2")
    prepare_run(cut)
    first = [m["loss"] for m in Trainer(cut).fit()]
    resumed = Trainer(config("leftovers-b"))
    assert resumed.resume() and resumed.step == 2
    assert first + [m["loss"] for m in resumed.fit()] == full


def test_a_checkpoint_of_the_old_epoch_rule_is_resumed_only_where_both_rules_agree(features, tiny_t5_encoder):
    """Before EpochSteps every epoch ran epoch 0's step count; such a trainer.json (no "epoch_steps") names another
    data position once a later epoch ran more batches: refused there in one message, resumed where they agree."""
    import json
    from pathlib import Path

    from pixart.train import checkpoint
    from pixart.train.config import TrainConfig
    from pixart.train.prepare import prepare_run
    from pixart.train.trainer import Trainer
    from storage.commit import DONE_SUFFIX
    from storage.configio import load_config
    from storage.errors import PipelineError

    def config(run, *extra):
        return load_config(TrainConfig, "tiny-stage3", [f"output_root={features}", f"run={run}",
                                                        "data.caption_set=tiny", f"t5_model={tiny_t5_encoder}",
                                                        "data.batch_size=3", "data.prefetch=0",
                                                        "schedule.checkpoint_every=1", "schedule.keep_checkpoints=10",
                                                        "init_any_step=true", *extra], kind="train")

    def old_rule(run, step):  # the state an older version would have written at `step` (marker and trainer.json)
        url = dict(checkpoint.list_checkpoints(features, run))[step]
        for path in (Path(url + DONE_SUFFIX), Path(url) / "trainer.json"):
            state = json.loads(path.read_text())
            assert state.pop("epoch_steps") == "per-epoch"
            path.write_text(json.dumps(state))

    for run, step, agree in (("old-rule-a", 2, True), ("old-rule-b", 3, False)):  # epochs of 1, 1, 6 steps
        cfg = config(run, f"schedule.max_steps={step}")
        prepare_run(cfg)
        list(Trainer(cfg).fit())
        old_rule(run, step)
        again = Trainer(config(run))
        if agree:  # step 2 is epoch 2's start under both rules
            assert again.resume() and again.step == 2
        else:  # step 3: old rule epoch 3's start, new rule one step into epoch 2
            with pytest.raises(PipelineError, match=r"every epoch ran epoch 0's 1 steps.*step 3"):
                again.resume()


def test_epoch_steps_positions_every_step_as_the_epochs_add_up_from_any_thread():
    """EpochSteps.position(step) against the running sum of each epoch's min over ranks, for random bucket counts;
    positions asked from 4 threads at once (the prefetch thread and a checkpoint save do) give the same answers."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from pixart.data.loader import batches_in_epoch
    from pixart.train.state import EpochSteps

    rng = random.Random(3)
    for _ in range(20):
        batch = rng.randint(2, 7)
        counts = [[[rng.randint(1, 30) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(1, 2))]
                  for _ in range(rng.randint(1, 4))]  # ranks x streams x buckets
        per_epoch = [min(sum(batches_in_epoch(s, batch, e) for s in rank) for rank in counts) for e in range(60)]
        if per_epoch[0] == 0:
            continue
        expected = []
        for epoch, n in enumerate(per_epoch):
            expected += [(epoch, i) for i in range(n)]
        steps = list(range(len(expected)))
        rng.shuffle(steps)
        plan = EpochSteps(counts, batch)
        with ThreadPoolExecutor(4) as pool:
            got = dict(zip(steps, pool.map(plan.position, steps), strict=True))
        assert [got[s] for s in range(len(expected))] == expected

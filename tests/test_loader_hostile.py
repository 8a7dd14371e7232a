"""The loader on feature shards that are not what their indexes promise (issue 15, defects 3-6): corrupt .npy and tar
headers, index rows that lie about sizes or repeat a key, and DataLoader workers. Corrupt shards are copies of the
session's tiny-model features with bytes edited in place; the worker tests plan over small synthetic indexes (the
split and the resume only read indexes) with a loader whose `collate` returns the keys alone."""

from __future__ import annotations

import itertools
import json
import shutil
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import torch

from pixart.data.index import FeatureShard, feature_shards
from pixart.data.loader import BucketedLoader, batches_per_rank
from pixart.features.format import INDEX_SCHEMA
from storage.parquet import read_rows, write_table
from tests.hostile import edit_index

# ---------------------------------------------------------------------------------------------------------------------
# helpers: a private copy of the features, members located with tarfile, .npy headers rewritten in place
# ---------------------------------------------------------------------------------------------------------------------


def copy_features(features: str, tmp_path: Path) -> str:
    shutil.copytree(Path(features) / "features" / "sam", tmp_path / "features" / "sam")
    return str(tmp_path)


def sam256(root: str) -> list[FeatureShard]:
    return feature_shards(root, "sam", 256, caption_set="tiny")


def loader(shards: list[FeatureShard], **kw) -> BucketedLoader:
    return BucketedLoader(shards, **{"batch_size": 4, "seed": 1, "drop_last": False, **kw})


def pick(shards: list[FeatureShard], position: str) -> tuple[int, str]:
    """(shard index, key) of a sample that comes first in its batch (it fixes the batch's shapes and takes the range
    path) or later (read straight into its slot), from the plan alone."""
    batches = list(loader(shards).plan())
    e = batches[0][0] if position == "first" else batches[0][2]
    return e.shard, e.key


def tar_of(shard: FeatureShard, kind: str) -> Path:
    return Path((shard.latents if kind == "latent.npy" else shard.text).removesuffix(".parquet") + ".tar")


def member(tar: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(tar, "r:") as tf:
        return tf.getmember(name)


def edit_bytes(tar: Path, at: int, new: bytes) -> None:
    data = bytearray(tar.read_bytes())
    data[at:at + len(new)] = new
    tar.write_bytes(bytes(data))


def edit_npy_header(tar: Path, name: str, edit) -> None:
    """Rewrite the header dict of .npy member `name` in place (same length, space-padded as numpy pads it); the tar
    header's checksum does not cover member data, so only the .npy header is wrong afterwards."""
    start = member(tar, name).offset_data
    data = bytearray(tar.read_bytes())
    assert data[start:start + 8] == b"\x93NUMPY\x01\x00"
    length = int.from_bytes(data[start + 8:start + 10], "little")
    head = data[start + 10:start + 10 + length].decode("latin1")
    new = edit(head.rstrip(" \n")).ljust(length - 1) + "\n"
    assert len(new) == length and new != head
    data[start + 10:start + 10 + length] = new.encode("latin1")
    tar.write_bytes(bytes(data))


def shape_of(head: str) -> tuple[int, ...]:
    return tuple(int(x) for x in head.split("'shape': (", 1)[1].split(")", 1)[0].split(",") if x.strip())


def replace_shape(head: str, shape: tuple[int, ...]) -> str:
    return head.replace(f"'shape': {shape_of(head)}", f"'shape': {tuple(shape)}")


def read_all(shards: list[FeatureShard], **kw) -> list[dict]:
    return list(loader(shards, **kw))


def assert_named(err: BaseException, path: Path | str, key: str) -> None:
    text = str(err)
    assert str(path) in text and key in text, text


# ---------------------------------------------------------------------------------------------------------------------
# 3. An .npy header that is not what the index promises: an error naming the file and the key, never a cast
# ---------------------------------------------------------------------------------------------------------------------

CORRUPTIONS = {
    "dtype": lambda head: head.replace("'<f2'", "'<i2'"),
    "fortran": lambda head: head.replace("False", "True"),
    # the same number of elements: the member's byte count still adds up
    "shape": lambda head: replace_shape(head, (shape_of(head)[0] * 2, shape_of(head)[1] // 2, *shape_of(head)[2:])),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("position", ["first", "later"])
@pytest.mark.parametrize("kind", ["latent.npy", "t5.npy"])
def test_a_header_that_breaks_the_promise_is_an_error_naming_file_and_key(features, tmp_path, corruption, position,
                                                                         kind):
    """`<f2` edited to `<i2` once cast the whole batch to int16 (or the clean samples of it), fortran order served
    transposed data, and a shape with the same element count either fixed the batch's shape or named a clean key."""
    shards = sam256(copy_features(features, tmp_path))
    index, key = pick(shards, position)
    tar = tar_of(shards[index], kind)
    edit_npy_header(tar, f"{key}.{kind}", CORRUPTIONS[corruption])
    for pad in (True, False):
        with pytest.raises(ValueError) as info:
            read_all(shards, pad_text=pad, sample_posterior=pad)
        assert_named(info.value, tar, key)


# ---------------------------------------------------------------------------------------------------------------------
# 4. The index is not trusted for sizes and fields
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("claimed", [4_000_000_000, 10 ** 12])
@pytest.mark.parametrize("position", ["first", "later"])
def test_an_index_row_claiming_a_huge_range_is_refused_before_anything_is_allocated(features, monkeypatch, claimed,
                                                                                    position):
    """4e9 claimed bytes made the loader allocate and zero 4 GB before a short read; 1e12 gave a MemoryError."""
    shards = sam256(features)
    index, key = pick(shards, position)
    edit_index(monkeypatch, f"/latents/256/{shards[index].name}.parquet",
               lambda rows: next(r for r in rows if r["key"] == key).update(bytes=claimed))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            read_all(shards)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    assert_named(info.value, tar_of(shards[index], "latent.npy"), key)


@pytest.mark.parametrize("position", ["first", "later"])
def test_a_text_index_row_claiming_more_than_max_tokens_rows_is_refused_before_it_is_read(features, tmp_path,
                                                                                         monkeypatch, position):
    """A text range inside its tar but longer than max_tokens rows of the widest T5 can need: the first sample of a
    batch was bounded only by the tar's size, so a remote tar would have had the whole range fetched into memory.
    The tar is extended (sparse) so that the claim lies inside it."""
    from pixart.data import collate

    shards = sam256(copy_features(features, tmp_path))
    index, key = pick(shards, position)
    tar = tar_of(shards[index], "t5.npy")
    claimed = 64 << 20
    # more than 512 rows (MAX_STORED_TOKENS) of the widest T5 (4096) in float16 and 1 MiB of headers can need
    with open(tar, "r+b") as f:
        f.truncate(tar.stat().st_size + claimed)
    edit_index(monkeypatch, shards[index].text,
               lambda rows: next(r for r in rows if r["key"] == key).update(bytes=claimed))
    read, real_read = [], collate.TarReader.read
    monkeypatch.setattr(collate.TarReader, "read",
                        lambda self, url, span: read.append(span) or real_read(self, url, span))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"the sample needs at most") as info:
            read_all(shards, pad_text=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20 and all(length < claimed for _, length in read)
    assert_named(info.value, tar, key)


def test_img_hw_and_class_come_from_the_index_for_every_sample(features, monkeypatch):
    """The first sample of a batch took img_hw (and the class) from its json, the others from the index."""
    shards = feature_shards(features, "sam", 512, multi_scale=True, caption_set="tiny")

    def shift(rows):
        for r in rows:
            r["orig_h"], r["orig_w"] = r["orig_h"] + 7, r["orig_w"] + 3

    edit_index(monkeypatch, ".parquet", lambda rows: shift(rows) if rows and rows[0].get("orig_h") else None)
    import pixart.data.index as data

    want = {r["key"]: [r["orig_h"], r["orig_w"]] for s in shards for r in data.read_rows(s.latents)}
    batches = list(BucketedLoader(shards, batch_size=2, seed=3, drop_last=False))
    assert sum(len(b["keys"]) for b in batches) == len(want)
    for b in batches:
        assert b["img_hw"].tolist() == [want[k] for k in b["keys"]]

    imagenet = feature_shards(features, "imagenet", 256)
    edit_index(monkeypatch, "imagenet1k-train-0000.parquet",
               lambda rows: [r.update(label=r["label"] + 1) for r in rows])
    labels = {r["key"]: r["label"] for s in imagenet for r in data.read_rows(s.latents)}
    batches = list(BucketedLoader(imagenet, batch_size=2, seed=3, drop_last=False))
    assert all(b["cls"].tolist() == [labels[k] for k in b["keys"]] for b in batches)


@pytest.mark.parametrize("side", ["latents", "text"])
def test_a_key_listed_twice_in_an_index_is_an_error_naming_index_and_key(features, monkeypatch, side):
    """A duplicated latent row served its key twice per epoch; a duplicated text row silently replaced the first."""
    shards = sam256(features)
    suffix = f"/{'latents/256' if side == 'latents' else 'text/tiny'}/{shards[1].name}.parquet"
    key = read_rows(shards[1].latents)[2]["key"]
    edit_index(monkeypatch, suffix, lambda rows: rows.append(dict(next(r for r in rows if r["key"] == key))))
    url = shards[1].latents if side == "latents" else shards[1].text
    with pytest.raises(ValueError) as info:
        read_all(shards)
    assert_named(info.value, url, key)
    with pytest.raises(ValueError) as info:
        batches_per_rank(shards, 2, 1)
    assert_named(info.value, url, key)


# ---------------------------------------------------------------------------------------------------------------------
# 5. Every read error names the shard file and the key
# ---------------------------------------------------------------------------------------------------------------------


def bad_magic(tar: Path, name: str) -> None:
    edit_bytes(tar, member(tar, name).offset_data, b"\x00")


def size_mismatch(tar: Path, name: str) -> None:  # "... its header says 18432" for a [8, 32, 32] latent
    edit_npy_header(tar, name, lambda head: replace_shape(head, (*shape_of(head)[:-1], shape_of(head)[-1] + 4)))


def object_array(tar: Path, name: str) -> None:
    edit_npy_header(tar, name, lambda head: head.replace("'<f2'", "'|O'"))


def bad_checksum(tar: Path, name: str) -> None:  # the sample's first member (its json): "checksum at byte 0"
    first = member(tar, name.split(".", 1)[0] + ".json")
    edit_bytes(tar, first.offset + 136, b"7")  # a digit of the mtime field


def bad_member_checksum(tar: Path, name: str) -> None:  # the array member's own tar header
    edit_bytes(tar, member(tar, name).offset + 136, b"7")


READ_ERRORS = {"bad magic": bad_magic, "size": size_mismatch, "object": object_array, "checksum": bad_checksum,
               "member checksum": bad_member_checksum}


@pytest.mark.parametrize("error", sorted(READ_ERRORS))
@pytest.mark.parametrize("position", ["first", "later"])
@pytest.mark.parametrize("kind", ["latent.npy", "t5.npy"])
def test_read_errors_name_the_shard_file_and_the_key(features, tmp_path, error, position, kind):
    shards = sam256(copy_features(features, tmp_path))
    index, key = pick(shards, position)
    tar = tar_of(shards[index], kind)
    READ_ERRORS[error](tar, f"{key}.{kind}")
    if error == "checksum" and position == "later":  # its json is never read: the index gives what it holds
        assert [k for b in read_all(shards) for k in b["keys"]].count(key) == 1
        return
    for pad in (True, False):
        with pytest.raises(ValueError) as info:
            read_all(shards, pad_text=pad)
        assert_named(info.value, tar, key)


@pytest.mark.parametrize("kind", ["latent.npy", "t5.npy"])
def test_a_directory_in_place_of_a_tar_is_an_error_naming_it_and_the_key(features, tmp_path, kind):
    shards = sam256(copy_features(features, tmp_path))
    index, key = pick(shards, "first")
    tar = tar_of(shards[index], kind)
    tar.unlink()
    tar.mkdir()
    with pytest.raises(Exception) as info:  # noqa: PT011 - any error, as long as it says where
        read_all(shards)
    assert_named(info.value, tar, key)


# ---------------------------------------------------------------------------------------------------------------------
# 6. DataLoader workers: part of the split and of the state
# ---------------------------------------------------------------------------------------------------------------------

SIZES = (5, 3, 8, 4, 7, 4, 6, 3, 9, 3, 5)  # samples per synthetic shard: uneven on purpose
BUCKETS = ("1.0", "0.5", "2.0")


@pytest.fixture(scope="module")
def index_shards(tmp_path_factory) -> list[FeatureShard]:
    """Latent indexes only (no tars): enough to plan. Keys are unique across shards, buckets mixed."""
    root = tmp_path_factory.mktemp("indexes")
    shards = []
    for s, n in enumerate(SIZES):
        rows = [{"key": f"k{s}_{i}", "bucket": BUCKETS[(s + i) % 3], "offset": 512 * i, "bytes": 512,
                 "status": "ok"} for i in range(n)]
        url = str(root / f"shard_{s:02d}.parquet")
        write_table(rows, url, INDEX_SCHEMA)
        shards.append(FeatureShard(f"shard_{s:02d}", url))
    return shards


class KeysOnly(BucketedLoader):
    """Plans like the loader, reads nothing: each batch is its keys (the split and the resume only need those)."""

    def collate(self, entries, files):
        return {"keys": [e.key for e in entries]}


def all_keys(shards: list[FeatureShard]) -> list[str]:
    return sorted(r["key"] for s in shards for r in read_rows(s.latents))


def rank_batches(shards, rank, world, workers, **kw) -> list[list[str]]:
    return [b["keys"] for b in KeysOnly(shards, 2, seed=5, rank=rank, world_size=world, num_workers=workers, **kw)]


def test_ranks_and_workers_split_every_key_exactly_once_and_counts_are_right(index_shards):
    """4 ranks x 2 workers gave [6, 6, 6, 0] batches against the computed [6, 6, 3, 3]: a rank with nothing would
    hang DDP. Every (ranks, workers) up to (4, 2): every key once per epoch, and batches_per_rank is what each rank's
    loader yields, in every epoch (leftovers carried in included)."""
    everything = all_keys(index_shards)
    for world, workers in itertools.product((1, 2, 3, 4), (1, 2)):
        seen = [k for rank in range(world) for b in rank_batches(index_shards, rank, world, workers, drop_last=False)
                for k in b]
        assert sorted(seen) == everything, (world, workers)
        expected = batches_per_rank(index_shards, 2, world, num_workers=workers)
        assert min(expected) > 0, (world, workers, expected)
        for epoch in range(3):
            expected = batches_per_rank(index_shards, 2, world, num_workers=workers, epoch=epoch)
            got = []
            for rank in range(world):
                ld = KeysOnly(index_shards, 2, seed=5, rank=rank, world_size=world, num_workers=workers)
                ld.set_epoch(epoch)
                got.append(sum(1 for _ in ld))
            assert got == expected, (world, workers, epoch)


def test_a_dataloader_with_workers_gives_the_loaders_own_batches_in_its_order(index_shards):
    """Through torch's DataLoader (2 worker processes per rank): the same batches, in the same order, as iterating
    the loader itself; across 2 ranks every key once."""
    seen = []
    for rank in range(2):
        own = rank_batches(index_shards, rank, 2, 2, drop_last=False)
        ld = KeysOnly(index_shards, 2, seed=5, rank=rank, world_size=2, num_workers=2, drop_last=False)
        dl = torch.utils.data.DataLoader(ld.dataset(), batch_size=None, num_workers=2)
        got = [b["keys"] for b in dl]
        assert got == own
        seen += [k for b in got for k in b]
    assert sorted(seen) == all_keys(index_shards)


def resumed(shards, state, consume: int, through_dataloader: bool) -> tuple[list, dict]:
    """Take `consume` batches (tracked) from a loader in `state` (None: fresh), return them and the state after."""
    ld = KeysOnly(shards, 2, seed=5, num_workers=2, drop_last=False)
    if state is not None:
        ld.load_state_dict(json.loads(json.dumps(state)))  # as trainer.json stores it
    source = torch.utils.data.DataLoader(ld.dataset(), batch_size=None, num_workers=2) if through_dataloader else ld
    taken, batches = [], iter(source)
    while len(taken) < consume and (batch := next(batches, None)) is not None:
        if through_dataloader:
            ld.track(batch)
        taken.append(batch["keys"])
    return taken, ld.state_dict()


def test_a_resume_with_unequal_worker_progress_replays_exactly_the_rest_in_order(index_shards):
    """Workers progress unequally (one stream runs dry first, the DataLoader takes them in turn): the resumed
    batches came in another order. Now the rest, in the uninterrupted order, at every point of the epoch."""
    full, _ = resumed(index_shards, None, 10 ** 6, through_dataloader=False)
    assert full == resumed(index_shards, None, 10 ** 6, through_dataloader=True)[0]
    for k in range(len(full) + 1):
        head, state = resumed(index_shards, None, k, through_dataloader=False)
        assert head + resumed(index_shards, state, 10 ** 6, through_dataloader=False)[0] == full, k
    for k in (3, len(full) - 2):  # unequal progress; the second after one worker's stream ran out
        head, state = resumed(index_shards, None, k, through_dataloader=True)
        assert len(set(state["consumed"].values())) > 1
        assert head + resumed(index_shards, state, 10 ** 6, through_dataloader=True)[0] == full, k


def test_the_state_records_the_worker_count_and_a_resume_with_another_is_refused(index_shards):
    """Saved with 2 workers, resumed with 3: 9 keys twice and 9 never. Now refused mid-epoch; at an epoch's start
    (nothing consumed) any worker count is fine."""
    _, state = resumed(index_shards, None, 3, through_dataloader=False)
    assert state["num_workers"] == 2
    three = KeysOnly(index_shards, 2, seed=5, num_workers=3, drop_last=False)
    with pytest.raises(ValueError, match="2 DataLoader workers.*3"):
        three.load_state_dict(json.loads(json.dumps(state)))
    fresh = KeysOnly(index_shards, 2, seed=5, num_workers=3, drop_last=False)
    fresh.load_state_dict({**state, "epoch": state["epoch"] + 1, "consumed": {}})
    assert sorted(k for b in fresh for k in b["keys"]) == all_keys(index_shards)
    legacy = {k: v for k, v in state.items() if k not in ("num_workers", "next")}  # a state from before the count
    with pytest.raises(ValueError, match="worker count"):
        KeysOnly(index_shards, 2, seed=5, num_workers=2, drop_last=False).load_state_dict(legacy)


def test_a_dataloader_with_another_worker_count_than_the_loader_is_refused(index_shards):
    ld = KeysOnly(index_shards, 2, seed=5, num_workers=2)
    with pytest.raises(Exception, match="num_workers=2.*1 workers"):  # noqa: PT011 - torch re-raises the worker's
        list(torch.utils.data.DataLoader(ld.dataset(), batch_size=None, num_workers=1))


def test_the_split_of_one_worker_per_rank_is_unchanged(index_shards):
    """Runs saved before workers counted keep their batch order: with one worker a rank's shards are i mod world,
    as before."""
    for world in (1, 2, 3):
        for rank in range(world):
            ld = BucketedLoader(index_shards, 2, seed=5, rank=rank, world_size=world)
            assert sorted(ld.stream_shards()) == [i for i in range(len(index_shards)) if i % world == rank]

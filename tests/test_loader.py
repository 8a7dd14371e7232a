"""The bucketed streaming loader over real extracted feature shards (tiny T5 and VAE)."""

import io

import numpy as np
import pytest
import torch

from pixart.data.index import feature_shards, shard_entries
from pixart.data.loader import BucketedLoader, batches_per_rank
from pixart.features.config import ExtractConfig
from pixart.features.extract import latent_files_of
from storage.manifest import committed_manifests
from storage.parquet import read_rows
from tests.hostile import edit_index


def all_batches(loader):
    return [b for b in loader]


def padded(batch):
    """The batch with "text" and "mask" whichever way the loader delivered the text (pad_text True or False)."""
    from pixart.data.finish import pad_text

    if "text_rows" not in batch:
        return batch
    text, mask = pad_text(batch["text_rows"], batch["n_tokens"])
    return {**batch, "text": text, "mask": mask}


def test_every_batch_is_one_bucket_with_padded_text_and_a_mask(features):
    shards = feature_shards(features, "sam", 512, multi_scale=True, caption_set="tiny")
    assert [s.name for s in shards] == ["sa_000000", "sa_000001"]
    batches = all_batches(BucketedLoader(shards, batch_size=2, drop_last=False))
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(r["key"] for s in shards for r in read_rows(s.latents))  # each key once
    tokens = {r["key"]: r["n_tokens"] for s in shards for r in read_rows(s.text)}
    for b in batches:
        n = len(b["keys"])
        assert len(set(b["aspect_ratio"].tolist())) == 1
        assert b["latents"].shape[0] == n and b["latents"].shape[1] == 4 and b["latents"].dtype == torch.float32
        assert b["text"].shape == (n, 120, 32) and b["mask"].shape == (n, 120)
        assert b["mask"].sum(1).tolist() == [tokens[k] for k in b["keys"]]
        assert (b["text"][b["mask"] == 0] == 0).all()
        assert b["img_hw"].shape == (n, 2)


def test_drop_last_keeps_only_full_batches(features):
    shards = feature_shards(features, "sam", 256, caption_set="tiny")
    batches = all_batches(BucketedLoader(shards, batch_size=3))
    assert len(batches) == 2 and all(len(b["keys"]) == 3 for b in batches)  # 8 squares: 2 full batches of 3
    assert all(b["latents"].shape == (3, 4, 32, 32) for b in batches)


def test_latents_are_sampled_from_the_stored_posterior(features):
    shards = feature_shards(features, "sam", 256, caption_set="tiny")
    batch = next(iter(BucketedLoader(shards, batch_size=1)))
    key = batch["keys"][0]
    shard = next(s for s in shards if key in {r["key"] for r in read_rows(s.latents)})
    row = next(r for r in read_rows(shard.latents) if r["key"] == key)
    from storage.wds import read_sample

    raw = open(latent_files_of(ExtractConfig(dataset="sam", what="latents", output_root=features), shard.name).tar,
               "rb").read()
    stored = np.load(io.BytesIO(read_sample(raw[row["offset"]:row["offset"] + row["bytes"]])["latent.npy"]),
                     allow_pickle=False).astype(np.float32)
    mean, std = stored[:4], stored[4:]
    eps = (batch["latents"][0].numpy() / 0.18215 - mean) / std
    assert abs(float(eps.mean())) < 0.5 and 0.5 < float(eps.std()) < 1.5  # standard normal noise


def test_the_posterior_can_be_handed_over_for_sampling_on_the_device(features):
    from pixart.data.finish import sample_posterior

    shards = feature_shards(features, "sam", 512, multi_scale=True, caption_set="tiny")
    sampled = all_batches(BucketedLoader(shards, batch_size=2, seed=4, drop_last=False))
    stored = all_batches(BucketedLoader(shards, batch_size=2, seed=4, drop_last=False, sample_posterior=False))
    for x, y in zip(sampled, stored, strict=True):
        assert "latents" not in y and y["posterior"].dtype == torch.float16 and y["noise_seed"].dtype == torch.int64
        assert y["posterior"].shape[1] == 2 * x["latents"].shape[1]
        assert torch.equal(sample_posterior(y["posterior"], y["noise_seed"]), x["latents"])
        assert torch.equal(x["text"], y["text"]) and x["keys"] == y["keys"]


def test_text_rows_padded_on_the_device_equal_the_loaders_padding(features):
    """pad_text=False: the valid rows back to back plus n_tokens; pad_text() gives the loader's padded text and mask
    exactly, for square and multi-scale batches, and a held batch keeps its rows while later ones load."""
    from pixart.data.finish import pad_text

    for size, ms in ((256, False), (512, True)):
        shards = feature_shards(features, "sam", size, multi_scale=ms, caption_set="tiny")
        ref = all_batches(BucketedLoader(shards, batch_size=3, seed=2, drop_last=False))
        rows = all_batches(BucketedLoader(shards, batch_size=3, seed=2, drop_last=False, pad_text=False))
        again = all_batches(BucketedLoader(shards, batch_size=3, seed=2, drop_last=False, pad_text=False))
        assert [b["keys"] for b in ref] == [b["keys"] for b in rows]
        for x, y, z in zip(ref, rows, again, strict=True):
            assert "text" not in y and "mask" not in y
            assert y["text_rows"].dtype == torch.float16 and y["n_tokens"].dtype == torch.int64
            assert y["n_tokens"].tolist() == x["mask"].sum(1).tolist()
            assert y["text_rows"].shape == (int(x["mask"].sum()), 32)
            text, mask = pad_text(y["text_rows"], y["n_tokens"])
            assert torch.equal(text, x["text"]) and torch.equal(mask, x["mask"])
            assert torch.equal(y["latents"], x["latents"]) and torch.equal(y["text_rows"], z["text_rows"])
    with pytest.raises(ValueError, match="4 text rows for n_tokens summing to 5"):
        pad_text(torch.zeros(4, 2), torch.tensor([2, 3]))


def test_same_seed_and_epoch_give_the_same_batches_and_epochs_differ(features):
    shards = feature_shards(features, "sam", 512, multi_scale=True, caption_set="tiny")
    a = all_batches(BucketedLoader(shards, batch_size=1, seed=7))
    b = all_batches(BucketedLoader(shards, batch_size=1, seed=7))
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    assert all(torch.equal(x["latents"], y["latents"]) for x, y in zip(a, b, strict=True))
    other = BucketedLoader(shards, batch_size=1, seed=7)
    other.set_epoch(1)
    c = all_batches(other)
    assert [x["keys"] for x in c] != [x["keys"] for x in a] or not torch.equal(c[0]["latents"], a[0]["latents"])


def test_ranks_and_dataloader_workers_split_without_duplicates_or_losses(features):
    shards = feature_shards(features, "sam", 256, caption_set="tiny")
    everything = sorted(k for b in BucketedLoader(shards, batch_size=1) for k in b["keys"])
    seen = []
    for rank in range(2):
        loader = BucketedLoader(shards, batch_size=1, rank=rank, world_size=2)
        seen += [k for b in loader for k in b["keys"]]
    assert sorted(seen) == everything and len(everything) == 8
    loader = BucketedLoader(shards, batch_size=1, num_workers=2)  # the worker count is part of the split
    dl = torch.utils.data.DataLoader(loader.dataset(), batch_size=None, num_workers=2)
    assert sorted(k for b in dl for k in b["keys"]) == everything


def test_each_rank_gets_the_counted_number_of_batches_in_every_epoch(features):
    """Training runs steps_per_epoch = min over ranks of batches_per_rank; a rank that got fewer batches in some
    epoch would stall the others (its loader runs dry while they wait in the all-reduce). With leftovers carried
    into the next epoch the count can grow by a batch per bucket after epoch 0, never shrink below epoch 0's."""

    shards = feature_shards(features, "sam", 512, multi_scale=True, caption_set="tiny")
    shards = shards + shards[:1]  # three shards over two ranks: uneven on purpose
    for world, batch_size in ((2, 1), (2, 2), (3, 1)):
        first = batches_per_rank(shards, batch_size, world)
        for epoch in range(4):
            expected = batches_per_rank(shards, batch_size, world, epoch=epoch)
            assert all(n >= f for n, f in zip(expected, first, strict=True))
            for rank in range(world):
                loader = BucketedLoader(shards, batch_size=batch_size, rank=rank, world_size=world, seed=epoch)
                loader.set_epoch(epoch)
                assert sum(1 for _ in loader.plan()) == expected[rank], (world, batch_size, epoch, rank)


def test_leftovers_carried_into_the_next_epoch_are_read_like_any_batch(features):
    """Batch 3 over the 512-ms buckets (8 samples, most buckets smaller than a batch): leftovers are carried, every
    key is trained within three epochs, the counts are batches_per_rank's, and a key a small bucket repeats in one
    batch (collected over epochs, as the official sampler does) reads the same rows each time."""

    shards = feature_shards(features, "sam", 512, multi_scale=True, caption_set="tiny")
    everything = {r["key"] for s in shards for r in read_rows(s.latents) if r["status"] == "ok"}
    served = set()
    for epoch in range(3):
        loader = BucketedLoader(shards, batch_size=3, seed=2)
        loader.set_epoch(epoch)
        batches = all_batches(loader)
        assert len(batches) == batches_per_rank(shards, 3, 1, epoch=epoch)[0]
        for b in batches:
            assert len(b["keys"]) == 3 and len(set(b["aspect_ratio"].tolist())) == 1
            for i, key in enumerate(b["keys"]):
                j = b["keys"].index(key)
                assert torch.equal(b["latents"][i], b["latents"][j]) and torch.equal(b["text"][i], b["text"][j])
            served.update(b["keys"])
    assert served == everything


def test_resume_mid_epoch_replays_exactly_the_remaining_batches(features):
    shards = feature_shards(features, "sam", 512, multi_scale=True, caption_set="tiny")
    full = all_batches(BucketedLoader(shards, batch_size=1, seed=3))
    first = BucketedLoader(shards, batch_size=1, seed=3)
    it = iter(first)
    seen = [next(it) for _ in range(3)]
    state = first.state_dict()
    resumed = BucketedLoader(shards, batch_size=1, seed=3)
    resumed.load_state_dict(state)
    rest = all_batches(resumed)
    got = seen + rest
    assert [b["keys"] for b in got] == [b["keys"] for b in full]
    assert all(torch.equal(x["latents"], y["latents"]) and torch.equal(x["text"], y["text"])
               for x, y in zip(got, full, strict=True))


def test_imagenet_batches_carry_class_labels(features):
    shards = feature_shards(features, "imagenet", 256)
    batch = next(iter(BucketedLoader(shards, batch_size=4)))
    labels = {r["key"]: r["label"] for m in committed_manifests(features, "imagenet") for r in read_rows(m)}
    assert batch["cls"].tolist() == [labels[k] for k in batch["keys"]] and "text" not in batch


def edit_text_index(monkeypatch, edit, suffix="/text/tiny/sa_000000.parquet"):
    """Make the loader see the rows of the index whose URL ends with `suffix` (default: shard sa_000000's text
    index) as `edit(rows)` leaves them."""
    edit_index(monkeypatch, suffix, edit)


def test_a_key_without_text_features_is_skipped(features, monkeypatch):
    shards = feature_shards(features, "sam", 256, caption_set="tiny")
    edit_text_index(monkeypatch, lambda rows: rows[0].update(status="error"))
    keys = [k for b in BucketedLoader(shards, batch_size=1) for k in b["keys"]]
    assert len(keys) == 7 and len(set(keys)) == 7


@pytest.mark.parametrize("pad", [True, False], ids=["padded", "rows"])
def test_the_three_read_paths_give_identical_batches(features, monkeypatch, pad):
    """Arrays read straight into the batch at the index's array_offset (one read, headers checked), located by their
    headers in the sample's first bytes (indexes written before array_offset existed), and the sample's range read
    whole and parsed (shards from other tar writers): the same batches."""

    import pixart.data.tar_reads as tar_reads

    shards = feature_shards(features, "sam", 512, multi_scale=True, caption_set="tiny")
    load = lambda: [padded(b) for b in BucketedLoader(shards, batch_size=2, seed=5, drop_last=False,  # noqa: E731
                                                      pad_text=pad)]
    direct = load()
    assert all(e.text_array and e.latent_array for i, s in enumerate(shards) for e in shard_entries(i, s))
    calls = []
    real = tar_reads.TarReader.read_array_rows
    monkeypatch.setattr(tar_reads.TarReader, "read_array_rows", lambda self, *a: calls.append(a[2]) or real(self, *a))
    assert load()[0]["keys"] == direct[0]["keys"]
    assert {c.split(".", 1)[1] for c in calls} == {"t5.npy", "latent.npy"}  # the direct path was taken

    def old_index(rows):  # as written before the columns existed
        for r in rows:
            for k in ("array_offset", "orig_h", "orig_w", "label"):
                r.pop(k, None)

    edit_text_index(monkeypatch, old_index, suffix=".parquet")
    located = load()
    monkeypatch.setattr(tar_reads.TarReader, "locate_npy", lambda self, *a: None)
    whole = load()
    for other in (located, whole):
        assert [b["keys"] for b in direct] == [b["keys"] for b in other]
        for x, y in zip(direct, other, strict=True):
            fields = ("latents", "text", "mask", "img_hw", "aspect_ratio")
            assert [k for k in fields if not torch.equal(x[k], y[k])] == []
            assert x["text"].dtype == torch.float16


@pytest.mark.parametrize("pad", [True, False], ids=["padded", "rows"])
def test_an_array_offset_that_points_elsewhere_falls_back_to_the_range(features, monkeypatch, pad):
    """A direct read whose headers do not check out (another key's member, bytes that are no header, a range past
    the end) is redone from the sample's byte range, whose headers must then keep the index's promise: the batch is
    still right."""
    shards = feature_shards(features, "sam", 256, caption_set="tiny")
    good = all_batches(BucketedLoader(shards, batch_size=4, seed=1))

    def scramble_text(rows):
        assert len(rows) == 4
        rows[0]["array_offset"], rows[1]["array_offset"] = rows[1]["array_offset"], rows[0]["array_offset"]
        rows[2]["array_offset"] += 7
        rows[3]["array_offset"] = 0

    def scramble_latents(rows):
        rows[0]["array_offset"], rows[1]["array_offset"] = rows[1]["array_offset"], rows[0]["array_offset"]
        rows[2]["array_offset"] = -512
        rows[3]["array_offset"] = 1 << 40  # past the end: a short read

    import pixart.data.tar_reads as tar_reads

    edit_text_index(monkeypatch, scramble_text)
    edit_text_index(monkeypatch, scramble_latents, suffix="/latents/256/sa_000000.parquet")
    refused = []
    real = tar_reads.TarReader.read_array_rows
    monkeypatch.setattr(tar_reads.TarReader, "read_array_rows",
                        lambda self, *a: real(self, *a) or refused.append(a[2]) or False)
    bad = [padded(b) for b in BucketedLoader(shards, batch_size=4, seed=1, pad_text=pad)]
    assert len(refused) >= 5  # direct reads refused, then redone from the range
    assert [b["keys"] for b in good] == [b["keys"] for b in bad]
    for x, y in zip(good, bad, strict=True):
        assert [k for k in ("latents", "text", "mask", "img_hw") if not torch.equal(x[k], y[k])] == []


@pytest.mark.parametrize("pad", [True, False], ids=["padded", "rows"])
@pytest.mark.parametrize("tokens", [1, -3], ids=["one-more", "negative"])
def test_a_token_count_the_headers_contradict_is_an_error_naming_file_and_key(features, monkeypatch, pad, tokens):
    """The index promises each sample's T5 row count: a header with another (here the index is the one that lies)
    is an error naming the tar and the key, not a layout silently redone from the headers."""
    shards = feature_shards(features, "sam", 256, caption_set="tiny")
    key = read_rows(shards[1].text)[2]["key"]

    def miscount(rows):
        row = next(r for r in rows if r["key"] == key)
        row["n_tokens"] = row["n_tokens"] + tokens if tokens > 0 else tokens

    edit_text_index(monkeypatch, miscount, suffix="/text/tiny/sa_000001.parquet")
    with pytest.raises(ValueError, match=f"sa_000001.tar: sample {key}: {key}.t5.npy is <f2"):
        all_batches(BucketedLoader(shards, batch_size=4, seed=1, pad_text=pad))


def test_text_arrays_are_reused_only_once_nothing_holds_them():
    from pixart.data.tar_reads import ArrayPool

    pool = ArrayPool(limit=3)
    ptr = lambda arr: arr.__array_interface__["data"][0]  # noqa: E731
    tensor_view = torch.from_numpy(pool.empty((2, 3), np.float16))[1:]  # a view keeps the array alive (its storage)
    first = tensor_view.data_ptr() - 6
    assert ptr(pool.empty((2, 3), np.float16)) != first  # held: a new one
    del tensor_view
    numpy_view = pool.empty((2, 3), np.float16)[0]
    assert ptr(numpy_view) == first  # released: reused
    assert ptr(pool.empty((2, 3), np.float16)) != first
    del numpy_view
    assert first in {ptr(pool.empty((2, 3), np.float16)) for _ in range(2)}
    assert pool.empty((4, 3), np.float16).shape == (4, 3) and pool.empty((2, 3), np.float32).dtype == np.float32
    assert len(pool.arrays) == 3  # bounded: the oldest is forgotten


def test_a_held_batch_is_never_overwritten(features):
    """Batches kept by the consumer (a training loop that keeps a few) keep their values while later ones load."""
    shards = feature_shards(features, "sam", 256, caption_set="tiny")
    held = list(BucketedLoader(shards, batch_size=2, seed=3))
    again = all_batches(BucketedLoader(shards, batch_size=2, seed=3))
    assert len({b["text"].data_ptr() for b in held}) == len(held)
    for x, y in zip(held, again, strict=True):
        assert torch.equal(x["text"], y["text"]) and torch.equal(x["mask"], y["mask"])


def test_an_index_pointing_at_the_wrong_bytes_is_a_clear_error(features, monkeypatch):
    def swap(rows):  # two keys' byte ranges swapped
        rows[0]["offset"], rows[1]["offset"] = rows[1]["offset"], rows[0]["offset"]

    shards = feature_shards(features, "sam", 256, caption_set="tiny")
    edit_text_index(monkeypatch, swap)
    with pytest.raises(ValueError, match="does not belong to sample"):
        all_batches(BucketedLoader(shards, batch_size=1, drop_last=False))


def test_prefetch_keeps_order_and_hands_errors_to_the_consumer():
    from pixart.data.prefetch import Prefetch

    def source():
        for i in range(5):
            yield {"i": torch.tensor(i)}
        raise ValueError("shard 3 is truncated")

    ahead = Prefetch(source(), depth=2)
    got = []
    with pytest.raises(ValueError, match="truncated"):
        for item in ahead:
            got.append(int(item["i"]))
    assert got == [0, 1, 2, 3, 4]
    stopped = Prefetch(iter([{"i": torch.tensor(0)}] * 100), depth=1)
    next(stopped)
    stopped.close()  # the reader thread ends instead of blocking on a full queue
    stopped.thread.join(timeout=5)
    assert not stopped.thread.is_alive()

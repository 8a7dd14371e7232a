"""Atomic shard commits, skip-on-rerun, --force, and the webdataset writer that never publishes a bad tar."""

import json
import os
import time

import pytest
import webdataset as wds

from storage.commit import commit_shard, is_done, read_done, write_done
from storage.ingest import shard as ingest_mod
from storage.ingest.config import IngestConfig
from storage.ingest.shard import ingest_shard, list_shards
from storage.manifest import committed_manifests, read_manifest
from storage.wds import EmptyShardError, ShardTarWriter


def test_commit_publishes_only_on_success(tmp_path):
    out = str(tmp_path / "x.parquet")
    with pytest.raises(RuntimeError):
        with commit_shard(out) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    with commit_shard(out) as tmp:
        assert tmp != out
        open(tmp, "wb").write(b"whole")
        assert not (tmp_path / "x.parquet").exists()  # invisible until the block ends
    assert (tmp_path / "x.parquet").read_bytes() == b"whole" and not is_done(out)
    write_done(out, {"n": 1})
    assert is_done(out) and read_done(out) == {"n": 1}


def test_recommit_removes_the_marker_first_and_cleans_stale_temps(tmp_path):
    out = str(tmp_path / "x.parquet")
    (tmp_path / "x.parquet.tmp-deadbeef").write_bytes(b"left by a killed run")
    (tmp_path / "x.parquet.done.tmp-0badf00d").write_bytes(b"left by a run that hit a full disk")
    for stale in ("x.parquet.tmp-deadbeef", "x.parquet.done.tmp-0badf00d"):
        os.utime(tmp_path / stale, (time.time() - 7200, time.time() - 7200))
    (tmp_path / "x.parquet.tmp-cafe0001").write_bytes(b"another run writing this shard right now")
    with commit_shard(out) as tmp:
        open(tmp, "wb").write(b"v1")
    write_done(out, {"v": 1})
    with pytest.raises(RuntimeError):
        with commit_shard(out) as tmp:
            assert not is_done(out), "a shard being replaced must not look done"
            raise RuntimeError
    # old leftovers are swept; a live writer's fresh temporary is not deleted under its feet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.parquet", "x.parquet.tmp-cafe0001"]


def test_crash_mid_shard_leaves_nothing_and_rerun_completes(samples, tmp_path, monkeypatch):
    cfg = IngestConfig(dataset="sam", source=samples["sam"], output_root=str(tmp_path))
    shard = list_shards(cfg)[0]
    real_row = ingest_mod.sample_row
    calls = {"n": 0}

    def dying_row(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed mid-shard")
        return real_row(*args, **kwargs)

    monkeypatch.setattr(ingest_mod, "sample_row", dying_row)
    with pytest.raises(KeyboardInterrupt):
        ingest_shard(shard, cfg)
    assert committed_manifests(str(tmp_path), "sam") == []
    assert not list(tmp_path.rglob("*.parquet*"))
    monkeypatch.setattr(ingest_mod, "sample_row", real_row)
    result = ingest_shard(shard, cfg)
    assert not result.skipped and result.num_ok == 4
    assert read_manifest(result.output_url).num_rows == 4


def test_rerun_skips_committed_shards_unless_forced(samples, tmp_path, monkeypatch):
    cfg = IngestConfig(dataset="sam", source=samples["sam"], output_root=str(tmp_path))
    first = [ingest_shard(s, cfg) for s in list_shards(cfg)]
    marker = json.loads((tmp_path / "manifests/sam/sa_000000.parquet.done").read_text())
    assert marker["num_ok"] == 4 and marker["config"]["dataset"] == "sam" and marker["config_hash"]

    def must_not_read(*a, **k):
        raise AssertionError("a committed shard was read again")

    from storage.ingest.sources.sa1b import SA1B

    monkeypatch.setattr(SA1B, "iter_samples", must_not_read)
    again = [ingest_shard(s, cfg) for s in list_shards(cfg)]
    assert all(r.skipped for r in again)
    assert [(r.num_ok, r.num_error, r.bytes) for r in again] == [(r.num_ok, r.num_error, r.bytes) for r in first]
    monkeypatch.undo()
    forced = ingest_shard(list_shards(cfg)[0], cfg.model_copy(update={"force": True}))
    assert not forced.skipped and forced.num_ok == 4


def test_wds_writer_publishes_readable_tars_only(tmp_path):
    import numpy as np

    with ShardTarWriter(str(tmp_path / "ok.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "t5.npy": np.full((2, 4), i, np.float16), "meta.json": {"i": i}})
    got = list(wds.WebDataset(str(tmp_path / "ok.tar"), shardshuffle=False).decode())
    assert [s["__key__"] for s in got] == ["k0", "k1", "k2"] and got[2]["t5.npy"].dtype == np.float16

    with pytest.raises(EmptyShardError):
        with ShardTarWriter(str(tmp_path / "empty.tar")):
            pass
    with pytest.raises(ValueError, match="without dots"):
        with ShardTarWriter(str(tmp_path / "dots.tar")) as w:
            w.write({"__key__": "a.b", "txt": "x"})
    with pytest.raises(RuntimeError):
        with ShardTarWriter(str(tmp_path / "crash.tar")) as w:
            w.write({"__key__": "a", "txt": "x"})
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.tar"]


def test_published_directories_are_never_replaced_and_the_first_publisher_wins(tmp_path):
    from storage.commit import publish_dir_once

    out = str(tmp_path / "index")

    def put(fs, path: str, data: bytes) -> None:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)

    def files() -> list[str]:
        return sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())

    with pytest.raises(RuntimeError):
        with publish_dir_once(out) as (fs, tmp):
            put(fs, f"{tmp}/a/part-0.parquet", b"v0")
            raise RuntimeError("crash mid-write")
    assert files() == []  # nothing published, no temporary left
    with publish_dir_once(out) as (fs, tmp):
        put(fs, f"{tmp}/a/part-0.parquet", b"v1")
        with publish_dir_once(out) as (fs2, tmp2):  # a second run building the same directory at the same time
            put(fs2, f"{tmp2}/b/part-0.parquet", b"v2")
    assert files() == ["index/b/part-0.parquet"]  # the first to publish wins; the other copy is dropped
    with publish_dir_once(out) as (fs, tmp):
        put(fs, f"{tmp}/c/part-0.parquet", b"v3")
    assert files() == ["index/b/part-0.parquet"]  # a published directory is never replaced under its readers


def test_a_full_disk_leaves_no_temporaries_and_old_ones_are_swept(tmp_path, monkeypatch):
    import builtins

    from storage.commit import write_atomic

    old = tmp_path / "quality.json.tmp-0ldc0de0"
    old.write_bytes(b"left by a run that hit a full disk before this fix")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    real_open = builtins.open

    def full_disk(file, mode="r", *a, **k):
        if "w" in mode and ".tmp-" in str(file):
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(str(tmp_path / "quality.json"), b"{}")
    with pytest.raises(OSError, match="No space left"):
        write_done(str(tmp_path / "x.parquet"), {"n": 1})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the new nor the old temporaries remain


def test_wds_writer_returns_each_samples_byte_range(tmp_path):
    import numpy as np

    from storage.wds import read_sample

    ranges = {}
    with ShardTarWriter(str(tmp_path / "r.tar")) as w:
        for i in range(5):
            ranges[f"k{i}"] = w.write({"__key__": f"k{i}", "t5.npy": np.full((i + 1, 3), i, np.float16).tobytes(),
                                       "json": b'{"i": %d}' % i})
    data = (tmp_path / "r.tar").read_bytes()
    for i, (offset, length) in enumerate(ranges.values()):
        got = read_sample(data[offset:offset + length])
        assert got == {"t5.npy": np.full((i + 1, 3), i, np.float16).tobytes(), "json": b'{"i": %d}' % i}

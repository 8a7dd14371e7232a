"""Concurrent runs, name collisions, duplicates across shards, stale indexes and look-ahead failures: every case
here once lost data silently or wedged a shard, and each test failed before its fix."""

import os
import shutil
import subprocess
import sys
import tarfile

import pyarrow as pa
import pytest

from captioning.captioner import Captioner
from captioning.config import CaptionConfig
from captioning.records import ensure_caption_set
from captioning.shard import CaptionShard
from captioning.text import T5TokenCounter
from flows._stage import LocalRuntime, call_with_retries, run_stage
from flows.ingest_stage import IngestStage
from storage.errors import ShardBusyError, SourceError, TransientSourceError
from storage.ingest.config import IngestConfig
from storage.ingest.shard import ingest_shard, list_shards, prepare
from storage.layout import safe_name
from storage.manifest import committed_manifests, read_dataset
from storage.shard import ShardResult, ShardWriter
from tests import images
from tests.archives import sa1b_pair, write_tar

GOOD = images.jpeg("chelsea", (90, 60))


def ingest_all(cfg: IngestConfig) -> list[dict]:
    outcome = run_stage(IngestStage(), "sam" if cfg.dataset == "sam" else cfg.dataset,
                        [f"{k}={v}" for k, v in cfg.model_dump(exclude={"decode"}).items() if v is not None],
                        False, LocalRuntime(retry_delays=()))
    assert outcome.ok, outcome.failed
    return read_dataset(cfg.output_root, cfg.dataset).to_pylist()


# ---------------------------------------------------------------------------------------------------------------------
# Names and duplicates
# ---------------------------------------------------------------------------------------------------------------------


def test_shard_names_are_injective_and_long_names_are_shortened(tmp_path):
    assert safe_name("sa_000001") == "sa_000001"
    assert safe_name("sa_000001.x") != safe_name("sa_000001_x")
    assert len(safe_name("a" * 254)) <= 96 and safe_name("a" * 254) != safe_name("a" * 253)
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "sa_000001.x.tar", [*sa1b_pair(1, GOOD, 90, 60), *sa1b_pair(2, GOOD, 90, 60)])
    write_tar(src / "sa_000001_x.tar", [*sa1b_pair(3, GOOD, 90, 60), *sa1b_pair(4, GOOD, 90, 60)])
    write_tar(src / f"sa_{'9' * 240}.tar", [*sa1b_pair(5, GOOD, 90, 60)])
    rows = ingest_all(IngestConfig(dataset="sam", source=str(src), output_root=str(tmp_path / "out"),
                                   worker_type="thread"))
    assert sorted(r["key"] for r in rows) == ["sa_1", "sa_2", "sa_3", "sa_4", "sa_5"]  # nothing silently lost
    assert len({r["shard"] for r in rows}) == 3


def test_duplicate_keys_in_one_shard_never_collide_with_real_keys(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    members = [*sa1b_pair(5, GOOD, 90, 60), *sa1b_pair(5, GOOD, 90, 60), *sa1b_pair(5, GOOD, 90, 60)]
    members += [(info.__class__(info.name.replace("sa_5", "sa_5__dup2")), data) for info, data in sa1b_pair(
        5, GOOD, 90, 60)]
    for info, data in members:
        info.size = len(data)
    write_tar(src / "sa_000000.tar", members)
    cfg = IngestConfig(dataset="sam", source=str(src), output_root=str(tmp_path / "out"))
    ingest_shard(list_shards(cfg)[0], cfg)
    keys = [r["key"] for r in read_dataset(cfg.output_root, "sam").to_pylist()]
    assert len(keys) == len(set(keys)), keys
    ok = {r["key"] for r in read_dataset(cfg.output_root, "sam").to_pylist() if r["status"] == "ok"}
    assert ok == {"sa_5", "sa_5__dup2"}


def test_a_tar_copied_under_a_second_name_is_listed_as_duplicates_without_rewriting_manifests(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "sa_000000.tar", [m for i in range(4) for m in sa1b_pair(i, GOOD, 90, 60)])
    shutil.copy(src / "sa_000000.tar", src / "sa_000007.tar")
    cfg = IngestConfig(dataset="sam", source=str(src), output_root=str(tmp_path / "out"), worker_type="thread")
    rows = ingest_all(cfg)
    manifest = cfg.output_root + "/manifests/sam/sa_000007.parquet"
    marker = open(manifest + ".done").read()
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)  # manifests are never rewritten
    from storage.ingest.dedupe import duplicates_of

    firsts = duplicates_of(cfg.output_root, "sam", "sa_000007")
    assert firsts == {f"sa_{i}": "sa_000000" for i in range(4)}
    assert duplicates_of(cfg.output_root, "sam", "sa_000000") == {}
    ingest_all(cfg)  # a re-run skips every shard and leaves the manifests and their markers as they were
    assert open(manifest + ".done").read() == marker
    out = subprocess.run([sys.executable, "-m", "flows", "audit", "sam", f"output_root={cfg.output_root}"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out
    assert "4 keys listed as duplicates of an earlier shard, 0 keys in two shards not listed" in out.stdout


# ---------------------------------------------------------------------------------------------------------------------
# JourneyDB: concurrent ingests and a replaced annotation file
# ---------------------------------------------------------------------------------------------------------------------


def test_two_journeydb_ingests_at_once_both_succeed_and_lose_nothing(samples, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flows", "ingest", "journeydb", f"source={samples['journeydb']}",
           f"annotations={samples['journeydb_annotations']}", f"output_root={out}", "worker_type=thread"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    # 3: a shard stayed busy in the other run past this one's retries (a loaded machine); that run commits it
    assert all(rc == 0 or (rc == 3 and "being processed by another run" in err) for _, err, rc in results), results
    rows = read_dataset(str(out), "journeydb").to_pylist()
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]


def test_a_replaced_annotation_file_gets_a_fresh_index(samples, tmp_path):
    import json

    anno = tmp_path / "anno.jsonl"
    lines = [json.loads(x) for x in tarfile.open(samples["journeydb_annotations"]).extractfile(
        "train_anno_realease_repath.jsonl").read().decode().splitlines()]
    anno.write_text("".join(json.dumps(r) + "\n" for r in lines if r["img_path"].startswith("./000/")))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(f"{samples['journeydb']}/000.tgz", imgs)
    cfg = IngestConfig(dataset="journeydb", source=str(imgs), annotations=str(anno), output_root=str(tmp_path / "o"))
    for s in list_shards(cfg):
        ingest_shard(s, cfg)
    anno.write_text("".join(json.dumps(r) + "\n" for r in lines))  # the full file now, at the same path
    os.utime(anno, (1, 1))  # even with an old mtime, the size differs
    shutil.copy(f"{samples['journeydb']}/001.tgz", imgs)
    for s in list_shards(cfg):
        ingest_shard(s, cfg)
    rows = read_dataset(cfg.output_root, "journeydb").to_pylist()
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]


def test_manifests_store_absolute_source_urls(samples, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(samples["sam"]))
    cfg = IngestConfig(dataset="sam", source=os.path.basename(samples["sam"]), output_root=str(tmp_path))
    ingest_shard(list_shards(cfg)[0], cfg)
    assert all(os.path.isabs(r["source_url"]) for r in read_dataset(str(tmp_path), "sam").to_pylist())


# ---------------------------------------------------------------------------------------------------------------------
# The committed-shard writer: leases, unique part names, one row per key
# ---------------------------------------------------------------------------------------------------------------------


def _rows(keys, tag):
    return [{"key": k, "caption": f"{tag}-{k}", "status": "ok"} for k in keys]


def test_two_attempts_at_once_still_commit_exactly_one_row_per_key(tmp_path):
    out = str(tmp_path / "caps" / "sa_000000.parquet")
    keys = [f"k{i}" for i in range(10)]
    schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("status", pa.string())])
    result = lambda: ShardResult(stage="t", dataset="d", shard="sa_000000", input_url="", output_url=out)  # noqa
    lineage = {"inputs": [], "config": "c", "models": {}}
    first = ShardWriter.open(out, keys, schema, result(), lineage, part_rows=2, lease_ttl=0.05)
    first.add(_rows(keys[:6], "a"))
    import time

    first.lease._stop.set()  # the first attempt stalls past its lease (no renewals): a second copy takes over
    time.sleep(0.2)
    second = ShardWriter.open(out, keys, schema, result(), lineage, part_rows=2, lease_ttl=60)
    assert second.todo == keys[6:]
    first.add(_rows(keys[6:], "a"))  # both attempts write the same keys: part names must not collide
    second.add(_rows(keys[6:], "b"))
    done = second.finalize({})
    assert (done.num_ok, done.num_error) == (10, 0)
    from storage.parquet import read_rows

    got = read_rows(out)
    assert [r["key"] for r in got] == keys


def test_a_live_lease_makes_a_second_run_step_aside(sam_manifests, tiny_llava, tiny_t5):
    cfg = CaptionConfig(dataset="sam", output_root=sam_manifests, model=tiny_llava, t5_tokenizer=tiny_t5)
    ensure_caption_set(cfg)
    counter = T5TokenCounter(tiny_t5)
    manifest = committed_manifests(sam_manifests, "sam")[0]
    holder = CaptionShard(manifest, cfg, counter)
    try:
        with pytest.raises(ShardBusyError, match="being processed by another run"):
            CaptionShard(manifest, cfg, counter)
    finally:
        holder.abort()
    CaptionShard(manifest, cfg, counter).abort()  # released: the next run gets it


def test_two_caption_runs_at_once_are_exactly_once(sam_manifests, tiny_llava, tiny_t5):
    overrides = [f"output_root={sam_manifests}", f"model={tiny_llava}", f"t5_tokenizer={tiny_t5}",
                 "generation.max_new_tokens=6", "batch_size=2", "part_rows=1"]
    cmd = [sys.executable, "-m", "flows", "caption", "sam", *overrides]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    # 3: a shard stayed busy in the other run past this one's retries (a loaded machine); that run commits it
    assert all(rc == 0 or (rc == 3 and "being processed by another run" in err) for _, err, rc in results), results
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "exactly-once verified" in again.stdout, again.stderr


@pytest.fixture
def sam_manifests(samples, tmp_path):
    cfg = IngestConfig(dataset="sam", source=samples["sam"], output_root=str(tmp_path / "root"))
    prepare(cfg)
    for s in list_shards(cfg):
        ingest_shard(s, cfg)
    return cfg.output_root


def test_a_broken_next_shard_does_not_fail_the_current_one(samples, tmp_path, tiny_llava, tiny_t5):
    from captioning.runner import CaptionRunner

    src = tmp_path / "sa1b"
    shutil.copytree(samples["sam"], src)
    cfg_i = IngestConfig(dataset="sam", source=str(src), output_root=str(tmp_path / "root"))
    for s in list_shards(cfg_i):
        ingest_shard(s, cfg_i)
    (src / "sa_000001.tar").unlink()  # the next shard's archive disappears after ingest
    cfg = CaptionConfig(dataset="sam", output_root=cfg_i.output_root, model=tiny_llava, t5_tokenizer=tiny_t5,
                        generation={"max_new_tokens": 4}, batch_size=2)
    ensure_caption_set(cfg)
    first, second = committed_manifests(cfg.output_root, "sam")
    runner = CaptionRunner(cfg, Captioner(cfg), T5TokenCounter(tiny_t5))
    try:
        assert runner.run(first, upcoming=second).num_ok == 4  # the healthy shard commits
        with pytest.raises(SourceError, match="does not exist") as err:
            runner.run(second)
        assert not err.value.transient  # permanent: not retried
    finally:
        runner.close()


def test_only_transient_errors_are_retried():
    calls = {"n": 0}

    def missing():
        calls["n"] += 1
        raise SourceError("/x: does not exist")

    with pytest.raises(SourceError):
        call_with_retries(missing, delays=(0, 0))
    assert calls["n"] == 1
    calls["n"] = 0

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise TransientSourceError("/x: cannot be read (ReadTimeoutError)")
        return {"ok": True}

    assert call_with_retries(flaky, delays=(0, 0)) == {"ok": True} and calls["n"] == 3


def test_missing_source_is_one_error_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows", "ingest", "sam", "source=/nonexistent",
                           f"output_root={tmp_path}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: /nonexistent: does not exist", proc.stderr
    assert not (tmp_path / "prefect.db").exists()


@pytest.mark.parametrize("args, message", [
    (["sam", "dataset=nope"], "unknown dataset 'nope'"),
    (["sam", "dataset=../../manifests/sam"], "unknown dataset"),
    (["sam", "caption_set=.."], "not a valid name"),
    (["sam", "caption_set=no-such-set"], "no caption set 'no-such-set'"),
    (["sam", "bogus=1"], "bogus"),
])
def test_audit_refuses_unknown_names(sam_manifests, args, message):
    proc = subprocess.run([sys.executable, "-m", "flows", "audit", *args, f"output_root={sam_manifests}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not os.path.exists(os.path.join(sam_manifests, "captions"))




def test_failed_and_finished_caption_runs_leave_no_empty_folders(sam_manifests, tiny_llava, tiny_t5):
    from flows.caption_stage import CaptionStage
    from storage.errors import PipelineError

    base = [f"output_root={sam_manifests}", f"t5_tokenizer={tiny_t5}", "generation.max_new_tokens=4"]
    with pytest.raises(PipelineError, match="cannot load"):
        run_stage(CaptionStage(), "sam", [*base, f"model={sam_manifests}/no-such-model"], False, LocalRuntime())
    assert not os.path.exists(os.path.join(sam_manifests, "captions"))
    outcome = run_stage(CaptionStage(), "sam", [*base, f"model={tiny_llava}"], False, LocalRuntime())
    assert outcome.ok
    set_dir = os.path.join(sam_manifests, "captions", "sam", outcome.extra["caption_set"])
    assert not os.path.exists(os.path.join(set_dir, "_parts"))
    assert not [f for f in os.listdir(set_dir) if ".tmp-" in f or f.endswith(".lease")]


def test_done_markers_carry_lineage(sam_manifests, tiny_llava, tiny_t5):
    import json

    from captioning.runner import caption_shard
    from storage.lineage import committed_identity, source_identity

    manifest = committed_manifests(sam_manifests, "sam")[0]
    ingest_marker = json.loads(open(manifest + ".done").read())
    source = ingest_marker["input_url"]
    assert ingest_marker["lineage"]["inputs"] == [{"url": source, "id": source_identity(source)}]
    assert ingest_marker["lineage"]["models"] == {}
    assert ingest_marker["lineage"]["config"] == ingest_marker["config_hash"]
    assert ingest_marker["content_id"]
    cfg = CaptionConfig(dataset="sam", output_root=sam_manifests, model=tiny_llava, t5_tokenizer=tiny_t5,
                        generation={"max_new_tokens": 4})
    ensure_caption_set(cfg)
    result = caption_shard(manifest, cfg, Captioner(cfg), T5TokenCounter(tiny_t5))
    lineage = json.loads(open(result.output_url + ".done").read())["lineage"]
    assert lineage["inputs"][0] == {"url": manifest, "id": ingest_marker["content_id"]}
    assert committed_identity(manifest) == ingest_marker["content_id"]
    assert lineage["models"] == {"captioner": tiny_llava, "t5_tokenizer": tiny_t5}
    assert lineage["config"] == result.config_hash and len(result.config_hash) == 12

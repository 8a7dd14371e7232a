"""Captioning ingested shards: exactly once per key, resume after a crash, bad images, caption sets, Ray, Prefect."""

import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from captioning.audit import audit_caption_set
from captioning.captioner import Captioner
from captioning.config import CaptionConfig
from captioning.records import ensure_caption_set
from captioning.runner import caption_shard
from captioning.text import T5TokenCounter
from storage.errors import ConfigError
from storage.ingest.config import IngestConfig
from storage.ingest.samples import add_member, jpeg_bytes, photo_variants, sa1b_json
from storage.ingest.shard import ingest_shard, list_shards, prepare
from storage.layout import caption_set_dir
from storage.manifest import committed_manifests


def ingest(cfg: IngestConfig) -> str:
    prepare(cfg)
    for s in list_shards(cfg):
        ingest_shard(s, cfg)
    return cfg.output_root


def corrupt_png() -> bytes:
    """Valid PNG header and IEND (passes ingest's header check), broken pixel data (fails decoding)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    idat = data.index(b"IDAT") + 4
    data[idat + 2: idat + 12] = b"\xff" * 10
    return bytes(data)


@pytest.fixture
def sam_root(samples, tmp_path):
    """SA-1B shard 0 as built, plus a shard holding a corrupt image between good ones and a manifest error row."""
    root = str(tmp_path / "root")
    src = tmp_path / "sa1b"
    src.mkdir()
    (src / "sa_000000.tar").write_bytes(open(samples["sam"] + "/sa_000000.tar", "rb").read())
    photos = photo_variants(3, 120)
    with tarfile.open(src / "sa_000001.tar", "w") as tf:
        for i, data, (w, h) in [(10, jpeg_bytes(photos[0]), photos[0].size), (11, corrupt_png(), (64, 48)),
                                (12, jpeg_bytes(photos[1]), photos[1].size), (13, b"", (1, 1))]:
            add_member(tf, f"sa_{i}.jpg", data)
            add_member(tf, f"sa_{i}.json", sa1b_json(i, w, h, random.Random(i), 2))
    ingest(IngestConfig(dataset="sam", source=str(src), output_root=root))
    return root


def config(root, tiny_llava, tiny_t5, **kw) -> CaptionConfig:
    base = dict(dataset="sam", output_root=root, model=tiny_llava, t5_tokenizer=tiny_t5,
                generation={"max_new_tokens": 12}, batch_size=3, part_rows=2)
    return CaptionConfig(**{**base, **kw})


def read_rows(cfg: CaptionConfig) -> dict[str, dict]:
    d = caption_set_dir(cfg.output_root, cfg.dataset, cfg.resolved_caption_set())
    rows = [r for shard in ("sa_000000", "sa_000001") for r in pq.read_table(f"{d}/{shard}.parquet").to_pylist()]
    return {r["key"]: r for r in rows}


def test_every_key_gets_one_row_and_bad_images_lose_nothing(sam_root, tiny_llava, tiny_t5):
    cfg = config(sam_root, tiny_llava, tiny_t5)
    ensure_caption_set(cfg)
    captioner, counter = Captioner(cfg), T5TokenCounter(tiny_t5)
    results = [caption_shard(m, cfg, captioner, counter) for m in committed_manifests(sam_root, "sam")]
    assert [(r.num_ok, r.num_error) for r in results] == [(4, 0), (2, 2)]
    rows = read_rows(cfg)
    assert "image not decodable" in rows["sa_11"]["error"]  # the corrupt image sat between two good ones
    assert rows["sa_13"]["error"].startswith("not ingested: empty")
    assert rows["sa_10"]["status"] == rows["sa_12"]["status"] == "ok"
    good = rows["sa_10"]
    assert good["model_id"] == tiny_llava and good["prompt"] == cfg.prompt and len(good["prompt_hash"]) == 12
    assert good["n_tokens"] == 12 and good["finish_reason"] == "length" and good["degenerate"] is not None
    assert good["t5_tokens"] > 0 and good["t5_truncated"] is False and good["seconds"] > 0
    assert json.loads(good["generation"])["max_new_tokens"] == 12
    report = audit_caption_set(sam_root, "sam", cfg.resolved_caption_set())
    assert report["ok"] and report["keys"] == report["rows"] == 8


def test_crash_mid_shard_then_rerun_is_exactly_once(sam_root, tiny_llava, tiny_t5, monkeypatch):
    cfg = config(sam_root, tiny_llava, tiny_t5, batch_size=1, part_rows=1)
    ensure_caption_set(cfg)
    captioner, counter = Captioner(cfg), T5TokenCounter(tiny_t5)
    manifest = committed_manifests(sam_root, "sam")[0]
    real, calls = captioner.generate, {"n": 0}

    def crash_on_third(inputs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA error: the GPU fell off the bus")
        return real(inputs)

    monkeypatch.setattr(captioner, "generate", crash_on_third)
    with pytest.raises(RuntimeError):
        caption_shard(manifest, cfg, captioner, counter)
    assert not audit_caption_set(sam_root, "sam", cfg.resolved_caption_set())["shards"][0]["committed"]
    calls["n"] = 100  # no more crashes; count what the re-run generates
    result = caption_shard(manifest, cfg, captioner, counter)
    assert result.resumed_rows == 2 and calls["n"] == 102, "only the two missing images are captioned again"
    rows = pq.read_table(result.output_url).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted({r["key"] for r in rows}) and len(rows) == 4
    shard0 = audit_caption_set(sam_root, "sam", cfg.resolved_caption_set())["shards"][0]
    assert shard0["committed"] and shard0["missing"] == shard0["duplicated"] == shard0["unknown"] == 0
    assert caption_shard(manifest, cfg, captioner, counter).skipped


def test_caption_sets_never_overwrite_each_other(sam_root, tiny_llava, tiny_t5):
    a = config(sam_root, tiny_llava, tiny_t5)
    b = config(sam_root, tiny_llava, tiny_t5, prompt="Describe this image briefly")
    c = config(sam_root, tiny_llava, tiny_t5, generation={"max_new_tokens": 13})
    assert len({a.resolved_caption_set(), b.resolved_caption_set(), c.resolved_caption_set()}) == 3
    assert a.resolved_caption_set() == config(sam_root, tiny_llava, tiny_t5, batch_size=7).resolved_caption_set()
    ensure_caption_set(a.model_copy(update={"caption_set": "mine"}))
    with pytest.raises(ConfigError, match="other settings"):
        ensure_caption_set(b.model_copy(update={"caption_set": "mine"}))


def test_journeydb_keeps_prompt_and_caption_and_chooses_training_text(samples, tmp_path, tiny_llava, tiny_t5):
    root = ingest(IngestConfig(dataset="journeydb", source=samples["journeydb"], output_root=str(tmp_path),
                               annotations=samples["journeydb_annotations"]))
    texts = {}
    for choice in ("llava", "prompt", "caption"):
        cfg = config(root, tiny_llava, tiny_t5, dataset="journeydb", training_text=choice, caption_set=choice)
        ensure_caption_set(cfg)
        res = caption_shard(committed_manifests(root, "journeydb")[0], cfg, Captioner(cfg), T5TokenCounter(tiny_t5))
        texts[choice] = pq.read_table(res.output_url).to_pylist()
    llava, prompt, caption = texts["llava"], texts["prompt"], texts["caption"]
    assert all(r["text"] == r["caption"] for r in llava)
    assert all(r["text"] == r["source_prompt"] and "--" not in r["text"] for r in prompt)
    assert all(r["source_prompt_raw"] and r["source_prompt"] for r in llava)
    with_task2 = [r for r in caption if r["source_caption"]]
    assert with_task2 and all(r["text"] == r["source_caption"] for r in with_task2)
    assert all(r["text"] == r["caption"] for r in caption if not r["source_caption"])  # null Task2.Caption


def test_ray_data_path_on_local_ray(sam_root, tiny_llava, tiny_t5):
    import ray

    from flows._ray_stage import run_on_ray
    from flows._stage import Shard
    from flows.caption_stage import CaptionStage

    cfg = config(sam_root, tiny_llava, tiny_t5, executor="ray", ray={"num_gpus_per_replica": 0})
    ensure_caption_set(cfg)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        done = []
        shards = [Shard(u.rsplit("/", 1)[-1][:-8], u) for u in committed_manifests(sam_root, "sam")]
        failed = run_on_ray(CaptionStage().ray_pipelines(cfg, shards), None, lambda name, r: done.append(r))
    finally:
        ray.shutdown()
    assert failed == {} and sorted(d["shard"] for d in done) == ["sa_000000", "sa_000001"]
    rows = read_rows(cfg)
    assert len(rows) == 8 and "image not decodable" in rows["sa_11"]["error"]
    local = config(sam_root, tiny_llava, tiny_t5, caption_set="local")
    ensure_caption_set(local)
    for m in committed_manifests(sam_root, "sam"):
        caption_shard(m, local, Captioner(local), T5TokenCounter(tiny_t5))
    assert {k: r["caption"] for k, r in read_rows(local).items()} == {k: r["caption"] for k, r in rows.items()}
    assert audit_caption_set(sam_root, "sam", cfg.resolved_caption_set())["ok"]


def test_caption_flow_publishes_artifacts(prefect_server, sam_root, tiny_llava, tiny_t5):
    from flows.caption import caption
    from tests.artifacts import run_artifacts

    overrides = [f"output_root={sam_root}", f"model={tiny_llava}", f"t5_tokenizer={tiny_t5}",
                 "generation.max_new_tokens=10", "batch_size=2"]
    state = caption(config="sam", overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    assert out["captions"] == 6 and out["errors"] == 2 and out["exactly_once"] and out["failed"] == []
    keys = ["caption-sam-progress", "caption-sam-samples", "caption-sam-quality"]
    arts = run_artifacts(state, keys)
    assert set(arts) == set(keys)
    assert "noun figures unavailable" in arts["caption-sam-quality"].data
    again = caption(config="sam", overrides=overrides, return_state=True).result()
    assert again["pending"] == 0
    missing = caption(config="sam", overrides=[*overrides, f"model={sam_root}/no-such-model", "caption_set=x"],
                      force=True, return_state=True)
    assert missing.is_failed() and missing.message.startswith("cannot load LLaVA model")


def test_audit_command_catches_a_duplicate(sam_root, tiny_llava, tiny_t5):
    cfg = config(sam_root, tiny_llava, tiny_t5)
    ensure_caption_set(cfg)
    for m in committed_manifests(sam_root, "sam"):
        caption_shard(m, cfg, Captioner(cfg), T5TokenCounter(tiny_t5))
    name = cfg.resolved_caption_set()
    cmd = [sys.executable, "-m", "flows", "audit", "sam", f"caption_set={name}", f"output_root={sam_root}"]
    for _ in range(10):  # this command once aborted at exit ("terminate called ...") in most runs
        ok = subprocess.run(cmd, capture_output=True, text=True)
        assert ok.returncode == 0 and ok.stdout.rstrip().endswith("OK") and not ok.stderr, (ok.stdout, ok.stderr)
    lines = ok.stdout.splitlines()  # error rows by reason, the particulars blanked, each with one example
    assert "sam manifests: 1 error rows by reason:" in lines, ok.stdout
    assert any(line.split()[0] == "1" and "image not decodable" in line and "sa_000001.parquet/sa_11" in line
               for line in lines), ok.stdout
    assert any(line.split()[0] == "1" and line.split()[1:3] == ["not", "ingested:"] for line in lines), ok.stdout
    path = f"{caption_set_dir(sam_root, 'sam', name)}/sa_000000.parquet"
    table = pq.read_table(path)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), path)  # one key twice
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1 and "duplicated=1" in bad.stdout and "FAILED" in bad.stdout


def test_runner_decodes_the_next_shard_ahead(sam_root, tiny_llava, tiny_t5):
    from captioning.runner import CaptionRunner

    cfg = config(sam_root, tiny_llava, tiny_t5, caption_set="ahead")
    ensure_caption_set(cfg)
    first, second = committed_manifests(sam_root, "sam")
    runner = CaptionRunner(cfg, Captioner(cfg), T5TokenCounter(tiny_t5))
    try:
        runner.run(first, upcoming=second)
        assert runner.warm is not None and runner.warm.url == second and runner.warm.pending
        result = runner.run(second)
        assert runner.warm is None and (result.num_ok, result.num_error) == (2, 2)
    finally:
        runner.close()
    assert audit_caption_set(sam_root, "sam", "ahead")["ok"]


def test_redo_errors_of_one_shard_recaptions_only_its_error_rows(sam_root, tiny_llava, tiny_t5, monkeypatch):
    """`redo=errors shards=[sa_000001]`: the error rows of that shard run again, its ok rows are kept as they were
    (no generate() for them), and the other shard is not touched; a plain re-run afterwards skips both."""
    from flows._stage import LocalRuntime, run_stage
    from flows.caption_stage import CaptionStage

    args = [f"output_root={sam_root}", f"model={tiny_llava}", f"t5_tokenizer={tiny_t5}",
            "generation.max_new_tokens=6", "batch_size=3"]
    assert run_stage(CaptionStage(), "sam", args, False, LocalRuntime(retry_delays=())).ok
    cfg = config(sam_root, tiny_llava, tiny_t5, generation={"max_new_tokens": 6}, batch_size=3)
    before = read_rows(cfg)
    errors = sorted(k for k, r in before.items() if r["status"] == "error" and "decodable" in (r["error"] or ""))
    assert errors == ["sa_11"]
    d = Path(caption_set_dir(sam_root, "sam", cfg.resolved_caption_set()))
    untouched = (d / "sa_000000.parquet").stat().st_mtime_ns
    decoded = []
    real = Captioner.encode
    monkeypatch.setattr(Captioner, "encode", lambda self, images: decoded.append(len(images)) or real(self, images))
    outcome = run_stage(CaptionStage(), "sam", [*args, "redo=errors", "shards=[sa_000001]"], False,
                        LocalRuntime(retry_delays=()))
    assert outcome.ok and [r["shard"] for r in outcome.results] == ["sa_000001"], outcome
    result = outcome.results[0]
    assert result["resumed_rows"] == 2 and result["stats"]["redone"] == "redo: 2 error rows", result
    assert decoded == []  # the one image still fails to decode; no ok row was captioned again
    after = read_rows(cfg)
    assert {k: r for k, r in after.items() if r["status"] == "ok"} == {k: r for k, r in before.items()
                                                                        if r["status"] == "ok"}
    assert (d / "sa_000000.parquet").stat().st_mtime_ns == untouched
    again = run_stage(CaptionStage(), "sam", args, False, LocalRuntime(retry_delays=()))
    assert again.ok and again.total == 0  # nothing pending

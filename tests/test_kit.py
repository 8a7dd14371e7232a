"""The stage kit's committed-shard writer and lineage: skip what is current, redo what is stale, resume what is
half done, and merge tar parts into one tar whose index is exact."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pixart.features.config import ExtractConfig
from pixart.features.encoders import LatentEncoder, TextEncoder
from pixart.features.extract import extract_latent_shard, extract_text_shard, latent_files_of, text_files_of
from pixart.features.format import INDEX_SCHEMA, LATENT_MEMBER, latent_sample
from storage.errors import PipelineError
from storage.hub import ModelLoadError
from storage.layout import caption_url
from storage.lineage import lineage, stale_reason
from storage.manifest import committed_manifests
from storage.parquet import read_rows
from storage.shard import ShardResult, ShardWriter
from storage.wds import load_npy, sample_members

SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("error", pa.string())])


def _result(out: str) -> ShardResult:
    return ShardResult(stage="t", dataset="d", shard="s", input_url="in", output_url=out)


def _rows(keys):
    return [{"key": k, "status": "ok", "error": None} for k in keys]


def test_a_committed_shard_is_skipped_for_its_lineage_and_redone_for_another(tmp_path):
    out = str(tmp_path / "out" / "s.parquet")
    same = {"inputs": [{"url": "in", "id": "a"}], "config": "c1", "models": {"m": "x"}}
    w = ShardWriter.open(out, ["k1", "k2"], SCHEMA, _result(out), same)
    w.add(_rows(["k1", "k2"]))
    first = w.finalize()
    assert not first.skipped and first.content_id
    again = ShardWriter.open(out, ["k1", "k2"], SCHEMA, _result(out), same)
    assert again.done is not None and again.done.skipped and again.lease is None
    for changed, why in (({**same, "inputs": [{"url": "in", "id": "b"}]}, "input in changed"),
                         ({**same, "models": {"m": "y"}}, "model m 'x' -> 'y' changed"),
                         ({**same, "config": "c2"}, "config changed")):
        w = ShardWriter.open(out, ["k1", "k2"], SCHEMA, _result(out), changed)
        assert w.done is None and why.split()[0] in w.result.stats["redone"], w.result.stats
        assert stale_reason(json.loads(Path(out + ".done").read_text()), changed) is not None
        w.abort()


def test_parts_written_for_another_lineage_are_not_resumed(tmp_path):
    out = str(tmp_path / "s.parquet")
    old = {"inputs": [{"url": "in", "id": "a"}], "config": "c", "models": {}}
    w = ShardWriter.open(out, ["k1", "k2", "k3"], SCHEMA, _result(out), old, part_rows=1)
    w.add(_rows(["k1", "k2"]))  # two parts committed, then the run dies
    w.abort()
    resumed = ShardWriter.open(out, ["k1", "k2", "k3"], SCHEMA, _result(out), old)
    assert resumed.todo == ["k3"] and resumed.result.resumed_rows == 2
    resumed.abort()
    new = {**old, "inputs": [{"url": "in", "id": "b"}]}  # the input changed meanwhile: its parts are worthless
    fresh = ShardWriter.open(out, ["k1", "k2", "k3"], SCHEMA, _result(out), new)
    assert fresh.todo == ["k1", "k2", "k3"] and fresh.result.resumed_rows == 0
    fresh.abort()


def test_an_unknown_or_missing_key_fails_the_finalize(tmp_path):
    out = str(tmp_path / "s.parquet")
    lin = {"inputs": [], "config": "c", "models": {}}
    w = ShardWriter.open(out, ["k1", "k2"], SCHEMA, _result(out), lin)
    w.add(_rows(["k1", "zz"]))
    with pytest.raises(PipelineError, match="1 missing, 1 unknown"):
        w.finalize()
    assert not os.path.exists(out + ".done") and w.lease is None


def _latent(key: str, value: float):
    mean = np.full((4, 2, 2), value, np.float16)
    return latent_sample(mean, mean, {"bucket": "1.0", "orig_hw": [16, 16]}, None)


def test_tar_parts_of_two_attempts_merge_into_one_sample_per_key_with_exact_offsets(tmp_path):
    out, tar = str(tmp_path / "f.parquet"), str(tmp_path / "f.tar")
    keys = [f"k{i}" for i in range(5)]
    lin = {"inputs": [], "config": "c", "models": {}}
    first = ShardWriter.open(out, keys, INDEX_SCHEMA, _result(out), lin, tar_url=tar, part_rows=2, lease_ttl=0.05)
    for i, k in enumerate(keys[:3]):
        members, fields = _latent(k, i)
        first.add_sample(k, members, {**fields, "status": "ok", "error": None}, LATENT_MEMBER)
    first.lease._stop.set()  # the first attempt stalls past its lease: a second copy takes over and overlaps it
    import time

    time.sleep(0.2)
    second = ShardWriter.open(out, keys, INDEX_SCHEMA, _result(out), lin, tar_url=tar, part_rows=2)
    assert second.todo == keys[2:]  # k0, k1 were committed as a part; k2 is still in the stalled run's buffer
    first.flush()  # the stalled run commits k2 after all
    for i, k in enumerate(keys[2:], start=2):
        members, fields = _latent(k, 10 + i)
        second.add_sample(k, members, {**fields, "status": "ok", "error": None}, LATENT_MEMBER)
    result = second.finalize()
    assert (result.num_ok, result.num_error) == (5, 0)
    index = read_rows(out)
    data = Path(tar).read_bytes()
    assert [r["key"] for r in index] == keys and result.bytes + 1024 == len(data)
    for r in index:
        members = sample_members(data[r["offset"]:r["offset"] + r["bytes"]], r["key"])  # the range is that key's
        direct = load_npy(data[r["array_offset"]:r["offset"] + r["bytes"]][512:512 + len(members[LATENT_MEMBER])])
        assert np.array_equal(direct, load_npy(members[LATENT_MEMBER]))
    k2 = index[2]
    k2_range = data[k2["offset"]:k2["offset"] + k2["bytes"]]  # the stalled run's k2 was committed first: it stays
    assert float(load_npy(sample_members(k2_range, "k2")[LATENT_MEMBER])[0, 0, 0]) == 2.0
    assert not (tmp_path / "_parts").exists()


def test_an_attempt_that_lost_its_lease_publishes_nothing_so_tar_and_index_stay_paired(tmp_path):
    """A stalled run whose lease another run took over must not publish its own merge (tar, index or marker), before
    or after the new owner's: two attempts' merges can differ, and an index must only point into its own tar."""
    import time

    from storage.errors import ShardBusyError

    out, tar = str(tmp_path / "f.parquet"), str(tmp_path / "f.tar")
    keys = [f"k{i}" for i in range(4)]
    lin = {"inputs": [], "config": "c", "models": {}}
    stalled = ShardWriter.open(out, keys, INDEX_SCHEMA, _result(out), lin, tar_url=tar, part_rows=1, lease_ttl=0.05)
    for i, k in enumerate(keys):
        members, fields = _latent(k, i)
        stalled.add_sample(k, members, {**fields, "status": "ok", "error": None}, LATENT_MEMBER)
    stalled.lease._stop.set()  # it stops renewing: another copy of the task takes the shard over
    time.sleep(0.2)
    owner = ShardWriter.open(out, keys, INDEX_SCHEMA, _result(out), lin, tar_url=tar, part_rows=1)
    assert owner.todo == []
    with pytest.raises(ShardBusyError, match="lost its lease"):
        stalled.finalize()  # before the owner's finalize: nothing of it published
    assert not Path(out).exists() and not Path(tar).exists() and not Path(out + ".done").exists()
    owner.finalize()
    published = {p: Path(p).read_bytes() for p in (out, tar, out + ".done")}
    assert [r["key"] for r in read_rows(out)] == keys
    late = ShardWriter.open(out, keys, INDEX_SCHEMA, _result(out), lin, tar_url=tar)
    assert late.done is not None  # committed for this lineage: skipped, nothing rewritten
    assert {p: Path(p).read_bytes() for p in published} == published


def test_a_t5_that_is_neither_local_nor_cached_fails_at_once_naming_the_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"T5 tokenizer 'nobody/no-such-t5'.*t5_model=<local dir>"):
        TextEncoder("nobody/no-such-t5")


@pytest.fixture
def features_copy(captioned, tmp_path):
    root = tmp_path / "root"
    for part in ("manifests", "captions"):
        shutil.copytree(Path(captioned) / part, root / part)
    return str(root)


def test_a_new_vae_redoes_the_latents_and_leaves_the_text_features_alone(features_copy, tiny_t5_encoder, tiny_vae,
                                                                        tmp_path):
    cfg = ExtractConfig(dataset="sam", caption_set="tiny", output_root=features_copy, t5_model=tiny_t5_encoder,
                        vae_model=tiny_vae)
    manifest = committed_manifests(features_copy, "sam")[0]
    captions = caption_url(features_copy, "sam", "tiny", "sa_000000")
    text, vae = TextEncoder(tiny_t5_encoder), LatentEncoder(tiny_vae)
    extract_text_shard(captions, cfg, text)
    extract_latent_shard(manifest, cfg, vae)
    text_marker = Path(text_files_of(cfg, "sa_000000").index + ".done").read_bytes()
    assert extract_latent_shard(manifest, cfg, vae).skipped  # nothing changed

    other = str(tmp_path / "other-vae")
    shutil.copytree(tiny_vae, other)  # the same weights under another id: the lineage names the model by id
    new = cfg.model_copy(update={"vae_model": other})
    redone = extract_latent_shard(manifest, new, LatentEncoder(other))
    assert not redone.skipped and "model vae" in redone.stats["redone"]
    assert extract_text_shard(captions, new, text).skipped  # text does not depend on the VAE
    assert Path(text_files_of(cfg, "sa_000000").index + ".done").read_bytes() == text_marker
    marker = json.loads(Path(latent_files_of(new, "sa_000000").index + ".done").read_text())
    assert marker["lineage"]["models"] == {"vae": other}
    # a base-size change is a latent setting, not a text one
    assert lineage([captions], {"a": 1}) != lineage([captions], {"a": 2})


def test_training_refuses_features_of_another_t5_and_takes_the_recorded_one_when_not_told(features_copy,
                                                                                          tiny_t5_encoder, tiny_vae,
                                                                                          tmp_path):
    from flows.train_stage import load_train_config
    from pixart.train.prepare import check_features

    cfg = ExtractConfig(dataset="sam", caption_set="tiny", output_root=features_copy, t5_model=tiny_t5_encoder,
                        vae_model=tiny_vae)
    for m in committed_manifests(features_copy, "sam"):
        extract_text_shard(caption_url(features_copy, "sam", "tiny", m.rsplit("/", 1)[-1][:-8]), cfg,
                           TextEncoder(tiny_t5_encoder))
        extract_latent_shard(m, cfg, LatentEncoder(tiny_vae))
    base = [f"output_root={features_copy}", "data.caption_set=tiny", "run=r"]
    told = load_train_config("tiny-stage2", base)  # neither encoder given: the features' lineage names both
    assert (told.t5_model, told.vae_model) == (tiny_t5_encoder, tiny_vae)
    assert check_features(told)["shards"] == 2
    other = str(tmp_path / "other-t5")  # the same width (the same weights, even): only the lineage tells them apart
    shutil.copytree(tiny_t5_encoder, other)
    wrong = load_train_config("tiny-stage2", [*base, f"t5_model={other}"])
    with pytest.raises(PipelineError, match=r"shard sa_000000 was encoded with t5 .*t5_model="):
        check_features(wrong)


def test_a_vae_saved_again_at_the_same_path_redoes_its_latents_and_stops_training(features_copy, tiny_t5_encoder,
                                                                                   tiny_vae, tmp_path):
    """Same name, other weights (fine-tuned and saved in place): the lineage's model_ids tell them apart."""
    import torch
    from diffusers import AutoencoderKL

    from flows.train_stage import load_train_config
    from pixart.train.prepare import check_features

    vae_dir = str(tmp_path / "vae")
    shutil.copytree(tiny_vae, vae_dir)
    cfg = ExtractConfig(dataset="sam", caption_set="tiny", output_root=features_copy, t5_model=tiny_t5_encoder,
                        vae_model=vae_dir)
    text = TextEncoder(tiny_t5_encoder)
    manifests = committed_manifests(features_copy, "sam")
    for m in manifests:
        extract_text_shard(caption_url(features_copy, "sam", "tiny", m.rsplit("/", 1)[-1][:-8]), cfg, text)
        extract_latent_shard(m, cfg, LatentEncoder(vae_dir))
    run = load_train_config("tiny-stage2", [f"output_root={features_copy}", "data.caption_set=tiny", "run=r"])
    assert run.vae_model == vae_dir and check_features(run)["shards"] == 2
    assert extract_latent_shard(manifests[0], cfg, LatentEncoder(vae_dir)).skipped  # nothing changed yet

    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.01)
    vae.save_pretrained(vae_dir)
    with pytest.raises(PipelineError, match=r"shard sa_000000 was encoded with vae .* its files have changed since"):
        check_features(run)
    redone = extract_latent_shard(manifests[0], cfg, LatentEncoder(vae_dir))
    assert not redone.skipped and "same name, other files" in redone.stats["redone"]
    captions = caption_url(features_copy, "sam", "tiny", "sa_000000")
    assert extract_text_shard(captions, cfg, text).skipped  # text does not depend on the VAE


def test_model_identity_follows_the_files_not_the_path(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from storage.hub import SMALL_FILE, model_identity

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"width": 8}')
    weights = np.random.default_rng(0).integers(0, 255, SMALL_FILE + (1 << 20), dtype=np.uint8)  # sampled, not whole
    (model / "model.safetensors").write_bytes(weights.tobytes())
    first = model_identity(str(model))
    assert first.startswith("dir:") and model_identity(str(model)) == first
    shutil.copytree(model, tmp_path / "copy")
    assert model_identity(str(tmp_path / "copy")) == first  # same files elsewhere: same model
    (model / "model.safetensors").write_bytes(np.random.default_rng(1).integers(
        0, 255, weights.size, dtype=np.uint8).tobytes())  # retrained: same size, other bytes
    retrained = model_identity(str(model))
    assert retrained not in (first, None)
    (model / "config.json").write_text('{"width": 9}')
    assert model_identity(str(model)) not in (retrained, first, None)
    assert model_identity(str(tmp_path / "absent")) is None

    cache = tmp_path / "hf"  # a hub id: the commit of its cached snapshot, None when not cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert model_identity("org/tiny-t5") is None
    repo = cache / "models--org--tiny-t5"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert model_identity("org/tiny-t5") == "rev:abc123"


def test_how_a_stage_runs_is_not_part_of_its_lineage_but_what_it_writes_is():
    from captioning.config import CaptionConfig
    from storage.ingest.config import IngestConfig
    from storage.lineage import effective_config

    base = CaptionConfig(dataset="sam")
    for runtime in ({"batch_size": 4}, {"executor": "ray"}, {"part_rows": 3}, {"output_root": "/elsewhere"},
                    {"force": True}, {"max_shards": 1}, {"ray": {"num_replicas": 8}}):
        assert effective_config(base.model_copy(update=runtime)) == effective_config(base), runtime
    for setting in ({"prompt": "Describe it."}, {"model": "other/llava"}, {"max_tokens": 77}):
        assert effective_config(base.model_copy(update=setting)) != effective_config(base), setting
    ingest = IngestConfig(dataset="sam", source="/a")
    assert effective_config(ingest.model_copy(update={"source": "/b", "workers": 8})) == effective_config(ingest)


def test_redo_errors_keeps_the_committed_samples_and_fills_in_the_failed_ones(features_copy, tiny_vae, monkeypatch):
    """A latent that came out non-finite is an error row; `redo=errors` re-encodes only that key and merges it
    with the committed samples, whose tar bytes are carried over: the index then reads back every key exactly."""
    cfg = ExtractConfig(dataset="sam", what="latents", output_root=features_copy, vae_model=tiny_vae)
    manifest = committed_manifests(features_copy, "sam")[0]
    encoder = LatentEncoder(tiny_vae)
    real = encoder.encode
    calls = []

    def first_nan(images):
        mean, std = real(images)
        calls.append(len(images))
        if len(calls) == 1:
            mean[0] = np.nan
        return mean, std

    monkeypatch.setattr(encoder, "encode", first_nan)
    first = extract_latent_shard(manifest, cfg, encoder)
    assert (first.num_ok, first.num_error) == (3, 1)
    files = latent_files_of(cfg, "sa_000000")
    kept = {r["key"]: r for r in read_rows(files.index) if r["status"] == "ok"}
    old_tar = Path(files.tar).read_bytes()
    calls.clear()
    calls.append(0)  # no NaN from here on
    redone = extract_latent_shard(manifest, cfg.model_copy(update={"redo": "errors"}), encoder)
    assert (redone.num_ok, redone.num_error, redone.resumed_rows) == (4, 0, 3) and calls[1:] == [1], redone
    data = Path(files.tar).read_bytes()
    for r in read_rows(files.index):
        members = sample_members(data[r["offset"]:r["offset"] + r["bytes"]], r["key"])
        if r["key"] in kept:  # carried over byte for byte
            o = kept[r["key"]]
            assert bytes(members[LATENT_MEMBER]) == bytes(sample_members(
                old_tar[o["offset"]:o["offset"] + o["bytes"]], r["key"])[LATENT_MEMBER])
    assert extract_latent_shard(manifest, cfg.model_copy(update={"redo": "errors"}), encoder).skipped

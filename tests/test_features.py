"""Feature pre-extraction on tiny random T5 and VAE models: real photos in the real shard formats."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from pixart.buckets import assign
from pixart.features.config import ExtractConfig
from pixart.features.encoders import LatentEncoder, TextEncoder
from pixart.features.extract import extract_latent_shard, extract_text_shard, latent_files_of, text_files_of
from storage.layout import caption_url
from storage.lineage import committed_identity
from storage.manifest import committed_manifests
from storage.parquet import read_rows


def members(tar_url: str) -> dict[str, bytes]:
    with tarfile.open(tar_url) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isreg()}


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_text_features_store_only_the_valid_tokens(captioned, tiny_t5_encoder):
    cfg = ExtractConfig(dataset="sam", what="text", caption_set="tiny", output_root=captioned,
                        t5_model=tiny_t5_encoder, text_batch_size=3, force=True,
                        clean_caption=False)  # raw captions: compared with T5 on the raw text below
    encoder = TextEncoder(tiny_t5_encoder)
    caps = caption_url(captioned, "sam", "tiny", "sa_000000")
    result = extract_text_shard(caps, cfg, encoder)
    assert (result.num_ok, result.num_error) == (4, 0)
    tar_url, index_url = text_files_of(cfg, "sa_000000")
    got = members(tar_url)
    captions = {r["key"]: r["text"] for r in read_rows(caps)}
    assert sorted(got) == sorted(f"{k}.{ext}" for k in captions for ext in ("json", "t5.npy"))
    # PixArt's own call: padded to 120 with the mask; our unpadded rows must equal its first n rows
    tok = encoder.tokenizer(list(captions.values()), max_length=120, padding="max_length", truncation=True,
                            return_tensors="pt")
    with torch.inference_mode():
        ref = encoder.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    for i, key in enumerate(captions):
        feats = load_npy(got[f"{key}.t5.npy"])
        n = int(tok["attention_mask"][i].sum())
        assert feats.dtype == np.float16 and feats.shape == (n, 32)
        np.testing.assert_allclose(feats.astype(np.float32), ref[i, :n].numpy(), atol=2e-3, rtol=1e-2)
        assert json.loads(got[f"{key}.json"]) == {"caption": captions[key], "n_tokens": n}
    index = read_rows(index_url)
    assert [r["status"] for r in index] == ["ok"] * 4 and all(r["bytes"] > 0 and r["n_tokens"] for r in index)
    marker = json.loads(open(index_url + ".done").read())
    assert marker["lineage"]["inputs"] == [{"url": caps, "id": committed_identity(caps)}]
    assert marker["lineage"]["models"] == {"t5": tiny_t5_encoder}
    assert extract_text_shard(caps, cfg.model_copy(update={"force": False}), encoder).skipped
    extract_text_shard(caps, cfg.model_copy(update={"clean_caption": True}), encoder)  # the default, as others read


def test_failed_captions_become_error_rows(captioned, tiny_t5_encoder):
    from captioning.records import CAPTION_SCHEMA
    from storage.commit import write_done
    from storage.parquet import write_table

    rows = read_rows(caption_url(captioned, "sam", "tiny", "sa_000001"))
    rows[1].update(status="error", error="image not decodable: broken")
    bad = caption_url(captioned, "sam", "tiny-bad", "sa_000001")  # a set of its own: other tests read "tiny"
    write_table(rows, bad, CAPTION_SCHEMA)
    write_done(bad, {})
    cfg = ExtractConfig(dataset="sam", what="text", caption_set="tiny-bad", output_root=captioned,
                        t5_model=tiny_t5_encoder)
    result = extract_text_shard(bad, cfg, TextEncoder(tiny_t5_encoder))
    assert (result.num_ok, result.num_error) == (3, 1)
    errors = [r for r in read_rows(text_files_of(cfg, "sa_000001").index) if r["status"] == "error"]
    assert errors[0]["key"] == rows[1]["key"] and errors[0]["error"] == "no caption: image not decodable: broken"


def test_the_vae_batch_defaults_to_4_on_a_cpu_and_16_on_a_gpu(captioned, tiny_vae, tmp_path):
    """image_batch_size unset: 4 images per VAE pass on a CPU (larger ones run slower there), 16 on a GPU; a set
    value wins. The 256 px shard's 4 squares go through the CPU's VAE as one pass of 4."""
    cfg = ExtractConfig(dataset="sam", what="latents", output_root=str(tmp_path), vae_model=tiny_vae)  # own root
    assert (cfg.vae_batch_size(False), cfg.vae_batch_size(True)) == (4, 16)
    assert cfg.model_copy(update={"image_batch_size": 3}).vae_batch_size(True) == 3
    encoder, passes = LatentEncoder(tiny_vae, device="cpu"), []
    real = encoder.encode
    encoder.encode = lambda images: passes.append(len(images)) or real(images)
    extract_latent_shard(committed_manifests(captioned, "sam")[0], cfg, encoder)
    assert passes == [4]


@pytest.mark.parametrize("base_size, multi_scale", [(256, False), (512, True)])
def test_latents_are_cropped_to_the_bucket_and_store_mean_and_std(captioned, tiny_vae, base_size, multi_scale):
    cfg = ExtractConfig(dataset="sam", what="latents", output_root=captioned, vae_model=tiny_vae,
                        base_size=base_size, multi_scale=multi_scale, image_batch_size=2)
    manifest = committed_manifests(captioned, "sam")[0]
    result = extract_latent_shard(manifest, cfg, LatentEncoder(tiny_vae))
    assert (result.num_ok, result.num_error) == (4, 0)
    got = members(latent_files_of(cfg, "sa_000000").tar)
    manifest_rows = {r["key"]: r for r in read_rows(manifest)}
    for key, row in manifest_rows.items():
        meta = json.loads(got[f"{key}.json"])
        bucket = assign(row["height"], row["width"], base_size) if multi_scale else None
        h, w = (bucket.height, bucket.width) if bucket else (base_size, base_size)
        assert meta["bucket"] == (bucket.key if bucket else "1.0") and meta["orig_hw"] == [row["height"], row["width"]]
        left, top, right, bottom = meta["crop_box"]
        assert (bottom - top, right - left) == (h, w)
        latent = load_npy(got[f"{key}.latent.npy"])
        assert latent.dtype == np.float16 and latent.shape == (8, h // 8, w // 8)
        assert np.isfinite(latent).all() and (latent[4:] > 0).all()  # the second half is the posterior std


def test_imagenet_latents_carry_the_class(captioned, tiny_vae):
    cfg = ExtractConfig(dataset="imagenet", what="latents", output_root=captioned, vae_model=tiny_vae)
    manifest = committed_manifests(captioned, "imagenet")[0]
    assert extract_latent_shard(manifest, cfg, LatentEncoder(tiny_vae)).num_ok == 8
    got = members(latent_files_of(cfg, "imagenet1k-train-0000").tar)
    labels = {r["key"]: r["label"] for r in read_rows(manifest)}
    assert {k: int(got[f"{k}.cls"]) for k in labels} == labels


def test_the_drop_policy_turns_extreme_ratios_into_error_rows(captioned, tiny_vae, monkeypatch):
    import pixart.features.extract as features

    cfg = ExtractConfig(dataset="sam", what="latents", output_root=captioned, vae_model=tiny_vae, base_size=512,
                        multi_scale=True, bucket_policy="drop", force=True)
    manifest = committed_manifests(captioned, "sam")[1]
    rows = read_rows(manifest)
    rows[0].update(height=100, width=1000)  # a 1:10 panorama
    monkeypatch.setattr(features, "read_rows", lambda url, *a: rows)
    result = extract_latent_shard(manifest, cfg, LatentEncoder(tiny_vae))
    assert (result.num_ok, result.num_error) == (3, 1)
    index = {r["key"]: r for r in read_rows(latent_files_of(cfg, "sa_000001").index)}
    assert "outside 0.25-4.0 (bucket policy drop)" in index[rows[0]["key"]]["error"]
    monkeypatch.undo()
    extract_latent_shard(manifest, cfg, LatentEncoder(tiny_vae))  # restore: other tests read these features


def test_non_finite_latents_are_error_rows(captioned, tiny_vae):
    cfg = ExtractConfig(dataset="sam", what="latents", output_root=captioned, vae_model=tiny_vae, force=True)
    encoder = LatentEncoder(tiny_vae)
    real = encoder.encode

    def poisoned(images):
        mean, std = real(images)
        mean[0, 0, 0, 0] = np.inf
        return mean, std

    encoder.encode = poisoned
    result = extract_latent_shard(committed_manifests(captioned, "sam")[1], cfg, encoder)
    assert result.num_error >= 1 and result.num_ok + result.num_error == 4
    errors = [r for r in read_rows(latent_files_of(cfg, "sa_000001").index) if r["status"] == "error"]
    assert errors and all(r["error"] == "VAE returned non-finite latents" for r in errors)
    extract_latent_shard(committed_manifests(captioned, "sam")[1], cfg, LatentEncoder(tiny_vae))  # restore


def run_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "flows", "extract", *args], capture_output=True, text=True,
                          timeout=300)


def test_extract_command_estimates_runs_and_skips(captioned, tiny_t5_encoder, tiny_vae):
    import os

    models = [f"output_root={captioned}", "caption_set=tiny", f"t5_model={tiny_t5_encoder}", f"vae_model={tiny_vae}"]
    est = run_cli("sam-1024", *models, "--estimate")
    assert est.returncode == 0, est.stderr
    assert "sam: 8 images, 8 captions; per sample" in est.stdout and "of the official fp32 padded layout" in est.stdout
    first = run_cli("sam-1024", *models, "what=latents")  # 1024-ms latents: no other test writes them
    assert first.returncode == 0, first.stderr
    assert "sam: 2 shards, 0 already committed, 2 to run, 8 latents samples, 0 error rows" in first.stdout
    both = run_cli("sam-256", *models, "--force")  # text and latents of the same 8 images: apart, not as 16
    assert both.returncode == 0 and ", 8 text, 8 latents samples, 0 error rows" in both.stdout, both.stdout
    again = run_cli("sam-1024", *models, "what=latents")
    assert again.returncode == 0 and "sam: 2 shards, 2 already committed, 0 to run" in again.stdout, again.stdout
    out = os.path.join(captioned, "features", "sam", "latents", "1024-ms")
    hist = read_rows(os.path.join(out, "buckets.parquet"))
    assert len(hist) == 40 and sum(r["count"] for r in hist) == 8
    assert open(os.path.join(out, "buckets.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    missing = run_cli("sam-256", *models[:1], "caption_set=nope", f"t5_model={tiny_t5_encoder}")
    assert missing.returncode == 2 and "no caption set 'nope'" in missing.stderr, missing.stderr


def test_extract_flow_publishes_the_bucket_histogram(prefect_server, captioned, tiny_t5_encoder, tiny_vae):
    from flows.extract import extract
    from tests.artifacts import run_artifacts

    state = extract(config="imagenet-256", overrides=[f"output_root={captioned}", f"vae_model={tiny_vae}"],
                    force=True, return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["num_ok"] == 8
    keys = ["extract-imagenet-buckets", "extract-imagenet-progress"]
    assert set(run_artifacts(state, keys)) == set(keys)


def assert_same_encoding(batched: np.ndarray, single: np.ndarray) -> None:
    """A caption encoded in a batch against the same caption encoded alone. The fp32 sums run in another order for
    another batch shape (and thread count), so a value may land on the other side of an fp16 rounding boundary:
    allow one fp16 step of the value, plus 1e-5 for values near zero, where fp32 reassociation error (~1e-7 per
    O(1) term, a few dozen terms per layer) is larger than the fp16 step itself."""
    assert batched.shape == single.shape and batched.dtype == single.dtype == np.float16
    a, b = batched.astype(np.float32), single.astype(np.float32)
    step = np.spacing(np.maximum(np.abs(batched), np.abs(single))).astype(np.float32)
    assert np.all(np.abs(a - b) <= step + 1e-5), float(np.max(np.abs(a - b) - step))


def test_caption_cleaning_as_pixart_does_before_encoding(captioned, tiny_t5_encoder):
    from pixart.features.extract import clean_caption

    assert clean_caption("A CAT on https://x.org/a.jpg <b>sofa</b>") == "a cat on sofa"
    cfg = ExtractConfig(dataset="sam", what="text", caption_set="tiny", output_root=captioned, clean_caption=True,
                        t5_model=tiny_t5_encoder, force=True)
    encoder = TextEncoder(tiny_t5_encoder)
    caps = caption_url(captioned, "sam", "tiny", "sa_000000")
    extract_text_shard(caps, cfg, encoder)
    got = members(text_files_of(cfg, "sa_000000").tar)
    for r in read_rows(caps):
        meta = json.loads(got[f"{r['key']}.json"])
        assert meta["caption"] == r["text"] and meta["encoded_text"] == clean_caption(r["text"])
        assert_same_encoding(load_npy(got[f"{r['key']}.t5.npy"]), encoder.encode([meta["encoded_text"]])[0])


def test_ray_data_path_writes_the_same_features_as_the_local_one(captioned, tiny_t5_encoder, tiny_vae):
    import ray

    from flows._ray_stage import run_on_ray
    from flows._stage import Shard
    from flows.extract_stage import ExtractStage

    base = dict(dataset="sam", caption_set="tiny", output_root=captioned, t5_model=tiny_t5_encoder,
                vae_model=tiny_vae, base_size=512, multi_scale=True, image_batch_size=2)
    local = ExtractConfig(**base)
    on_ray = ExtractConfig(**{**base, "caption_set": "tiny-ray"}, executor="ray", ray={"num_gpus_per_replica": 0})
    import shutil

    shutil.copytree(os.path.join(captioned, "captions", "sam", "tiny"), os.path.join(captioned, "captions", "sam",
                                                                                     "tiny-ray"))
    manifests = committed_manifests(captioned, "sam")
    captions = [caption_url(captioned, "sam", "tiny-ray", m.rsplit("/", 1)[-1][:-8]) for m in manifests]
    latent_cfg = local.model_copy(update={"multi_scale": True, "base_size": 1024, "force": True})
    # One torch thread here and in every actor, whatever OMP_NUM_THREADS the suite runs under: the same kernels then
    # sum in the same order, so the two paths must agree bit for bit. (With 1 thread against 2, the tiny random VAE
    # amplifies oneDNN's reordered sums to 5e-2: no tolerance would mean anything.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for m in manifests:
            extract_latent_shard(m, latent_cfg, LatentEncoder(tiny_vae))
            extract_text_shard(caption_url(captioned, "sam", "tiny", m.rsplit("/", 1)[-1][:-8]),
                               local.model_copy(update={"force": True}), TextEncoder(tiny_t5_encoder))
    finally:
        torch.set_num_threads(threads)
    local_latents = {n: members(latent_files_of(latent_cfg, n).tar) for n in ("sa_000000", "sa_000001")}
    done = {}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        shards = [Shard("text-" + u.rsplit("/", 1)[-1][:-8], ("text", u)) for u in captions]
        shards += [Shard("latents-" + u.rsplit("/", 1)[-1][:-8], ("latents", u)) for u in manifests]
        pipelines = ExtractStage().ray_pipelines(on_ray.model_copy(update={"base_size": 1024, "force": True}), shards)
        failed = run_on_ray(pipelines, None, lambda name, r: done.setdefault(name, r))
    finally:
        ray.shutdown()
    assert failed == {} and sorted(done) == ["latents-sa_000000", "latents-sa_000001", "text-sa_000000",
                                             "text-sa_000001"]
    for name in ("sa_000000", "sa_000001"):
        a = members(text_files_of(local, name).tar)
        b = members(text_files_of(on_ray, name).tar)
        assert a.keys() == b.keys()
        assert all(np.array_equal(load_npy(a[k]), load_npy(b[k])) for k in a if k.endswith(".npy"))
        lat = members(latent_files_of(latent_cfg, name).tar)  # the Ray run rewrote the same 1024-ms shards (force)
        assert lat.keys() == local_latents[name].keys() and len(lat) == 8
        assert all(np.array_equal(load_npy(lat[k]), load_npy(local_latents[name][k])) for k in lat
                   if k.endswith(".npy"))
        assert all(lat[k] == local_latents[name][k] for k in lat if k.endswith(".json"))
        index = read_rows(latent_files_of(latent_cfg, name).index)
        assert [r["status"] for r in index] == ["ok"] * 4


def test_latent_images_are_decoded_in_full_unless_jpeg_draft_is_asked_for():
    """The official transform decodes the whole JPEG; the reduced-scale decode is an opt-in speed setting."""
    from pixart.buckets import apply_crop, fixed_bucket
    from pixart.features.extract import prepare_image
    from storage.decode import decode_image
    from storage.ingest.samples import jpeg_bytes, load_photo

    photo = load_photo("astronaut").resize((1350, 900))
    data = jpeg_bytes(photo)
    row = {"key": "k", "height": 900, "width": 1350}
    cfg = ExtractConfig(dataset="sam", what="latents", base_size=256, output_root="/unused")
    full = np.asarray(apply_crop(decode_image(data), fixed_bucket(256).crop(900, 1350)))
    pixels, meta = prepare_image(row, data, cfg)
    assert meta["resized_hw"] == [256, 384] and np.array_equal(pixels, full)
    drafted, _ = prepare_image(row, data, cfg.model_copy(update={"jpeg_draft": True}))
    diff = np.abs(drafted.astype(int) - full.astype(int))
    assert drafted.shape == full.shape and 0 < diff.mean() < 3  # decoded at half scale: close, not equal


# Hostile captions and what the official cleaning (DeepFloyd-IF clean_caption, applied twice by PixArt's T5 extractor
# and by diffusers' PixArtAlphaPipeline) makes of them: URLs, HTML and entities, CJK, IDs and file names go, case
# folds, runs of dots collapse; emoji and the ";;;;" run stay, as the official regexes leave them.
HOSTILE_CAPTIONS = {
    "A CAT on https://x.org/a.jpg <b>sofa</b>": "a cat on sofa",
    "Photo of a dog!!!!!! :) #cute @user www.example.com/page?x=1": "photo of a dog!!!!!! : cute ?x=1",
    "一只猫 sitting on a 桌子, 4k wallpaper": "sitting on a , 4k wallpaper",
    "Sunset 🌅 over the sea 🌊 — beautiful “quotes” and ‘single’":
        "sunset 🌅 over the sea 🌊 - beautiful \"quotes\" and 'single",
    "<p>An <i>oil</i> painting</p> &amp; more &quot;text&quot;": "an oil painting more \"text\"",
    "Describe... this.... image;;;; -- with   runs   of spaces": "describe this image;;;; - with runs of spaces",
    "IMG_1234.JPG shot on iPhone 12 1920x1080 free download": "shot on iphone 12",
    "a woman\nwith\ttabs and newlines": "a woman with tabs and newlines",
}


def test_captions_are_cleaned_by_default_as_training_and_inference_clean_them():
    from types import SimpleNamespace

    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import PixArtAlphaPipeline

    from pixart.features.extract import clean_caption

    assert ExtractConfig(dataset="sam", caption_set="x", output_root="/unused").clean_caption is True
    # What the exported pipeline does to a prompt (encode_prompt -> _text_preprocessing(clean_caption=True)).
    pipe = SimpleNamespace(_clean_caption=lambda t: PixArtAlphaPipeline._clean_caption(PixArtAlphaPipeline, t))
    for raw, want in HOSTILE_CAPTIONS.items():
        assert clean_caption(raw) == want, raw
        assert PixArtAlphaPipeline._text_preprocessing(pipe, raw, clean_caption=True) == [want], raw

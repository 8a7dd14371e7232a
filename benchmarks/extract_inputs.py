"""Inputs of `benchmarks/bench_extract.py`, built offline: LLaVA-like captions (20-60 words, deterministic), a
T5-style tokenizer, SA-1B-format shards from real photos with their manifests and caption sets, and T5 / VAE models
at tiny, small or real shapes with random weights (`build_t5`, `build_vae`: T5-XXL and SD-VAE configs from
../shared/reference/gpu-notes.md).
"""

from __future__ import annotations

import gc
import random
from pathlib import Path

import torch

from storage.ingest.samples import photo_variants, write_sa1b_tar

MAX_TOKENS = 120  # PixArt-alpha's T5 length

# ---------------------------------------------------------------------------------------------------------------------
# Captions: LLaVA-like, 20-60 words, deterministic
# ---------------------------------------------------------------------------------------------------------------------

OPENERS = ("The image features", "The image shows", "The image depicts", "In this image, there is",
           "This photograph captures", "The picture presents")
SUBJECTS = ("a woman in a dark blue jacket", "an astronaut in a white spacesuit", "a cup of coffee with latte art",
            "a tabby cat with green eyes", "a red vintage motorcycle", "a rocket standing on its launch pad",
            "a group of young people", "a small wooden fishing boat", "an old stone bridge over a river",
            "a busy city street with tall buildings", "a plate of fresh pasta with tomato sauce",
            "a golden retriever puppy", "a colorful hot air balloon", "a lighthouse on a rocky coast")
ACTIONS = ("standing", "sitting", "resting", "parked", "placed", "floating", "lying", "waiting")
PLACES = ("in front of a brick wall", "on a wooden table", "near a large window", "under a cloudy sky",
          "in the middle of a green field", "beside a quiet lake", "on a crowded sidewalk", "inside a cozy kitchen",
          "at the edge of a forest", "on a sandy beach at sunset")
DETAILS = ("The background is slightly blurred, drawing attention to the main subject.",
           "Soft natural light comes from the left, creating gentle shadows across the scene.",
           "Several trees and bushes can be seen in the distance.",
           "The colors are warm and vibrant, with shades of orange, yellow and brown.",
           "A few cars are parked along the side of the road.",
           "The scene conveys a calm and peaceful atmosphere.",
           "The overall style of the image is realistic, resembling a high-quality photograph.",
           "There are some potted plants and a stack of books nearby, adding a homely touch.",
           "The sky is clear and blue, with a few white clouds scattered across it.",
           "Reflections on the water add depth and texture to the composition.",
           "The subject appears to be the focal point, and the framing is balanced and centered.",
           "In the foreground, small details such as pebbles and leaves are visible.",
           "A person in a red shirt walks past on the right side of the frame.",
           "The lighting suggests it was taken in the late afternoon.")


def make_caption(rng: random.Random) -> str:
    target = rng.randint(20, 60)
    words = f"{rng.choice(OPENERS)} {rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}.".split()
    details = list(DETAILS)
    rng.shuffle(details)
    for sentence in details:
        if len(words) >= target:
            break
        words += sentence.split()
    return " ".join(words[:60]) if len(words) > 60 else " ".join(words)


def make_tokenizer(out_dir: Path) -> str:
    """A T5-style word-level tokenizer of the caption vocabulary (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(OPENERS + SUBJECTS + ACTIONS + PLACES + DETAILS)
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"],
                                                             show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                  model_max_length=MAX_TOKENS, model_input_names=["input_ids", "attention_mask"])
    tok.save_pretrained(out_dir)
    return str(out_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Data: SA-1B shards -> manifests, caption set, extracted JPEG folder
# ---------------------------------------------------------------------------------------------------------------------


def build_data(tmp: Path, images: int, shards: int, short_side: int, seed: int) -> dict:
    from captioning.config import CaptionConfig
    from captioning.records import CAPTION_SCHEMA, ensure_caption_set
    from storage.commit import write_done
    from storage.ingest.config import IngestConfig
    from storage.ingest.shard import ingest_shard, list_shards, prepare
    from storage.layout import caption_url
    from storage.manifest import committed_manifests
    from storage.parquet import read_rows, write_table
    from storage.readers import iter_manifest_images

    src, root, jpgs = tmp / "sa1b", tmp / "root", tmp / "official" / "images"
    src.mkdir(parents=True)
    jpgs.mkdir(parents=True)
    distinct = photo_variants(min(images, 9), short_side)  # the variants repeat with period 9
    per = -(-images // shards)
    for s in range(shards):
        chunk = [distinct[i % len(distinct)] for i in range(s * per, min(images, (s + 1) * per))]
        if chunk:
            write_sa1b_tar(src / f"sa_{s:06d}.tar", chunk, first_id=226381 + 100_000 * s, seed=s)
    icfg = IngestConfig(dataset="sam", source=str(src), output_root=str(root))
    ctx = prepare(icfg)
    for shard in list_shards(icfg):
        ingest_shard(shard, icfg, ctx)
    manifests = committed_manifests(str(root), "sam")

    ccfg = CaptionConfig(dataset="sam", output_root=str(root), model="bench/no-captioner", caption_set="bench")
    ensure_caption_set(ccfg)
    rng = random.Random(seed)
    captions, official_images, caption_urls = {}, [], []
    for m in manifests:
        rows = read_rows(m)
        caps = []
        for r in rows:
            text = make_caption(rng)
            captions[r["key"]] = text
            caps.append({"key": r["key"], "caption": text, "text": text, "model_id": ccfg.model,
                         "prompt": ccfg.prompt, "prompt_hash": ccfg.prompt_hash(), "generation": "{}",
                         "n_tokens": len(text.split()), "finish_reason": "stop", "seconds": 0.0,
                         "status": "ok", "error": None})
        url = caption_url(str(root), "sam", "bench", m.rsplit("/", 1)[-1].removesuffix(".parquet"))
        write_table(caps, url, CAPTION_SCHEMA)
        write_done(url, {"stage": "caption", "num_ok": len(caps), "note": "written by bench_extract"})
        caption_urls.append(url)
        for row, data, err in iter_manifest_images(rows):
            assert err is None, err
            path = jpgs / f"{row['key']}.jpg"
            path.write_bytes(data)
            official_images.append((row["key"], path))
    first = [r["key"] for r in read_rows(manifests[0], ["key"])]
    return {"root": str(root), "manifests": manifests, "caption_urls": caption_urls, "captions": captions,
            "images": sorted(official_images), "first_shard_keys": first}


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------

T5_SHAPES = {"small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=6, num_heads=8),
             "xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)}
VAE_SHAPES = {"small": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1),
              "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)}


def build_t5(shape: str, out_dir: Path, tokenizer_dir: str, device: str, dtype: torch.dtype) -> str:
    if shape == "tiny":
        from pixart.tiny import make_tiny_t5_encoder

        return make_tiny_t5_encoder(out_dir, tokenizer_dir)
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                   **T5_SHAPES[shape])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype != torch.float16 else torch.float32)  # T5 overflows in fp16
    try:
        with torch.device(device):  # T5-XXL: initialise on the GPU, in bf16 (9.5 GB instead of 19 GB fp32)
            model = T5EncoderModel(cfg)
        model.save_pretrained(out_dir)
    finally:
        torch.set_default_dtype(default)
    del model
    gc.collect()
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return str(out_dir)


def build_vae(shape: str, out_dir: Path) -> str:
    if shape == "tiny":
        from pixart.tiny import make_tiny_vae

        return make_tiny_vae(out_dir)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=256,
                  scaling_factor=0.18215, **VAE_SHAPES[shape]).save_pretrained(out_dir)
    return str(out_dir)

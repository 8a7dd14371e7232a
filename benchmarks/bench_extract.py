"""Throughput of feature pre-extraction (`pixart.features.extract`) against a per-image loop in the style of
PixArt-alpha's `tools/extract_features.py`: the same models, data and machine, measured in the same run.

Setup (untimed): SA-1B-format shards (`sa_NNNNNN.tar`, real photos from scikit-image cropped to varied aspect
ratios, short side --short-side px: 1500 by default, the size SA-1B ships) are ingested with `storage.ingest.shard`; a
caption set "bench" is written directly (CAPTION_SCHEMA rows with LLaVA-like captions of 20-60 words, done markers,
caption_set.yaml): no captioner runs. The JPEGs are also extracted to a folder, the layout the official script
reads.

Models (random weights, never downloaded; saved with save_pretrained and loaded back through the project's own
`from_pretrained(dir)` path):

    --shape tiny    pixart.tiny builders: T5 d_model 32 x 2 layers, VAE (8, 8, 16, 16): overheads dominate
    --shape small   T5 d_model 512, d_ff 1024, 6 layers, 8 heads; VAE (32, 64, 128, 128) x 1 layer per block
    --shape real    T5-XXL (d_model 4096, d_ff 10240, 24 layers, 64 heads, 4.7e9 params) and the SD VAE (128, 256,
                    512, 512) x 2 layers: meant for `--device cuda --dtype bfloat16` (fp32 T5-XXL needs ~20 GB RAM)
    --t5 / --vae    override one model's shape (tiny | small | xxl, tiny | small | sd)

Tokenizer: a T5-style word-level tokenizer of the caption vocabulary (pad 0, eos 1, unk 2, metaspace, punctuation
split off, "</s>" appended), so a caption costs about what T5's sentencepiece model charges (about a token per word
and punctuation mark, plus EOS; real T5 splits some rarer words further). The T5 models keep T5's real vocabulary
size (32128 rows) except tiny. `captioning.tiny.make_tiny_t5_tokenizer` is not used: its 120-piece vocabulary
spells most words letter by letter (a 38-word caption becomes 177 tokens), so every caption would hit the 120-token
cap and the unpadded layout would have nothing to save. The token counts are printed with the results.

Cases, interleaved (order rotated each round), best of --repeats after an untimed warm-up pass over the first shard:

    text official     per caption: tokenizer padding="max_length" 120 + T5 at batch 1; np.savez of the fp32 padded
                      [1, 120, d] `caption_feature` + int64 `attention_mask`, one .npz per sample (the official
                      script uses np.savez_compressed; --official-compress does that too, slower still)
    text project      extract_text_shard per caption shard: --text-batch-size captions per T5 pass, padded to the
                      longest of the batch, valid tokens only, fp16, one tar + parquet index + done marker per shard
    latents official  per image: PIL open + RGB, resize the short side to --base-size (torchvision's default
                      bilinear, as the official transform: its "# Image.BICUBIC" is a comment), centre crop,
                      [-1, 1] fp32, VAE at batch 1, np.save of concat(mean, std) fp32 [8, h/8, w/8], one .npy each
    latents project bN  extract_latent_shard per manifest shard: range reads from the SA-1B tar, reduced-scale JPEG
                      decode on --decode-threads threads, N images per VAE pass, fp16 mean+std, tar + index. On CPU
                      two rows by default: N=4 (the project's default on a CPU, where a conv net's activations at
                      larger batches overflow the caches) and N=16 (its GPU default); the first is the headline
    both ...          text + latents of the same side

The official baseline runs the same T5 object as the project (the official T5Embedder is bf16 on GPU, fp32 on CPU,
as the project's dtype "auto"); its VAE is always fp32, as in the official script. Bytes per sample count every file
each layout writes (project: tar + parquet index + done marker; official: the .npz / .npy files), not the
filesystem's block rounding, which costs the one-file-per-sample layout more. When the timed T5 is narrower than
T5-XXL, the bytes are also measured at width 4096: the same captions through `extract_text_shard` with a stub
encoder (random fp16 features of the real token counts) and official .npz files of random fp32, each written by its
layout's own code; the bytes goal is judged there. Nothing is asserted: a script, not a test.

    .venv/bin/python benchmarks/bench_extract.py [--shape tiny|small|real] [--images 64] [--repeats 3]
        [--device cpu|cuda] [--dtype auto|float32|bfloat16|float16] [--what text|latents|both]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's packages, installed or not (a GPU box)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from extract_inputs import MAX_TOKENS, build_data, build_t5, build_vae, make_tokenizer  # noqa: E402
from PIL import Image  # noqa: E402

THROUGHPUT_GOAL = 3.0  # project samples/s over the official loop's, text + latents
BYTES_GOAL = 0.30  # project bytes per sample over the official layout's

# ---------------------------------------------------------------------------------------------------------------------
# The official-style loops
# ---------------------------------------------------------------------------------------------------------------------


def official_text(items: list[tuple[str, str]], tokenizer, model, device: torch.device, out: Path,
                  compress: bool) -> int:
    """tools/extract_features.py extract_caption_t5 with T5Embedder.get_text_embeddings, one caption at a time."""
    save = np.savez_compressed if compress else np.savez
    with torch.no_grad():
        for key, text in items:
            tok = tokenizer([text.strip()], max_length=MAX_TOKENS, padding="max_length", truncation=True,
                            return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
            ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
            emb = model(input_ids=ids, attention_mask=mask)["last_hidden_state"].detach()
            save(out / f"{key}.npz", caption_feature=emb.float().cpu().data.numpy(),
                 attention_mask=mask.cpu().data.numpy())
    return len(items)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision T.Resize(size) + T.CenterCrop(size) on a PIL image, done with PIL directly: the short side to
    `size` (long side truncated), torchvision's default interpolation (bilinear, which PIL antialiases; the official
    script's "# Image.BICUBIC" is only a comment), then the centre crop."""
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def official_latents(items: list[tuple[str, Path]], vae, device: torch.device, size: int, out: Path) -> int:
    """tools/extract_features.py extract_img_vae: open, transform, encode and np.save one image at a time."""
    for key, path in items:
        img = resize_center_crop(Image.open(path).convert("RGB"), size)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)  # ToTensor
        x = ((x - 0.5) / 0.5).to(device)[None]  # Normalize([.5], [.5])
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = torch.cat([posterior.mean, posterior.std], dim=1).detach().cpu().numpy().squeeze()
        np.save(out / f"{key}.npy", z)
    return len(items)


# ---------------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------------


def measure(cases: dict[str, Callable[[bool], int]], repeats: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """A warm-up pass (each case on the first shard only), then `repeats` rounds running every case in full, the
    order rotated each round. Returns the times and the samples each case handled."""
    for fn in cases.values():
        fn(True)
    times: dict[str, list[float]] = {name: [] for name in cases}
    counts: dict[str, int] = {}
    names = list(cases)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            counts[name] = cases[name](False)
            times[name].append(time.perf_counter() - start)
    return times, counts


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class WidthStub:
    """Stands in for a T5 of width `d_model`: the real tokenizer's token counts, random fp16 features. Used only to
    measure bytes on disk at T5-XXL width when the timed T5 is narrower (bytes do not depend on the weights)."""

    def __init__(self, tokenizer, d_model: int) -> None:
        self.tokenizer, self.d_model, self.rng = tokenizer, d_model, np.random.default_rng(0)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.tokenizer(texts, max_length=MAX_TOKENS, truncation=True)["input_ids"]
        return [self.rng.standard_normal((len(i), self.d_model), dtype=np.float32).astype(np.float16) for i in ids]


def text_bytes_at_width(data: dict, cfg, tokenizer, d_model: int, tmp: Path) -> tuple[int, int]:
    """(project, official) text bytes at `d_model`, both written in their real formats: extract_text_shard with
    `WidthStub`, and the official .npz of fp32 [1, 120, d_model] + int64 mask."""
    from pixart.features.extract import extract_text_shard
    from storage.layout import text_features_dir

    root = tmp / "width"
    wcfg = cfg.model_copy(update={"output_root": str(root)})
    stub = WidthStub(tokenizer, d_model)
    for url in data["caption_urls"]:
        extract_text_shard(url, wcfg, stub)
    official = root / "official"
    official.mkdir()
    rng = np.random.default_rng(0)
    for key, text in data["captions"].items():
        mask = tokenizer([text], max_length=MAX_TOKENS, padding="max_length", truncation=True,
                         return_tensors="np")["attention_mask"].astype(np.int64)
        np.savez(official / f"{key}.npz", caption_feature=rng.standard_normal((1, MAX_TOKENS, d_model),
                                                                              dtype=np.float32),
                 attention_mask=mask)
    return dir_bytes(text_features_dir(str(root), "sam", "bench")), dir_bytes(official)


def quiet() -> None:
    """No progress bars or load warnings from transformers / diffusers in the output."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    dlog.set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("tiny", "small", "real"), default="tiny",
                    help="tiny (default, CPU), small (CPU, about a minute), real (T5-XXL + SD VAE, for a GPU)")
    ap.add_argument("--t5", choices=("tiny", "small", "xxl"), help="override the T5 shape")
    ap.add_argument("--vae", choices=("tiny", "small", "sd"), help="override the VAE shape")
    ap.add_argument("--what", choices=("text", "latents", "both"), default="both")
    ap.add_argument("--images", type=int, default=64, help="samples (images and captions) in all (default 64)")
    ap.add_argument("--shards", type=int, default=2, help="SA-1B shards to spread them over (default 2)")
    ap.add_argument("--short-side", type=int, default=1500,
                    help="source image short side in px (default 1500: SA-1B's released JPEGs)")
    ap.add_argument("--base-size", type=int, choices=(256, 512, 1024), default=256,
                    help="square latent size, both layouts (default 256; the official script uses 512)")
    ap.add_argument("--text-batch-size", type=int, default=64, help="project: captions per T5 pass (default 64)")
    ap.add_argument("--image-batch-size", type=int, nargs="+",
                    help="project: images per VAE pass; several values give one row each (default: 4 and 16 on "
                         "CPU, the project's CPU and GPU defaults; 16 on CUDA). The first is the headline one")
    ap.add_argument("--decode-threads", type=int, default=2, help="project: JPEG decode threads (default 2)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="project encoders and the shared T5 (auto: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--official-compress", action="store_true",
                    help="official text files with np.savez_compressed, exactly as tools/extract_features.py")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per case (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t5_shape = args.t5 or {"tiny": "tiny", "small": "small", "real": "xxl"}[args.shape]
    vae_shape = args.vae or {"tiny": "tiny", "small": "small", "real": "sd"}[args.shape]
    do_text, do_latents = args.what in ("text", "both"), args.what in ("latents", "both")
    batch_sizes = args.image_batch_size or ([16] if args.device == "cuda" else [4, 16])
    quiet()

    from pixart.features.config import ExtractConfig
    from pixart.features.encoders import LatentEncoder, TextEncoder, resolve_dtype
    from pixart.features.extract import extract_latent_shard, extract_text_shard
    from storage.layout import latents_dir, text_features_dir

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        data = build_data(tmp, args.images, args.shards, args.short_side, args.seed)
        tok_dir = make_tokenizer(tmp / "tokenizer")
        t5_dir = build_t5(t5_shape, tmp / "t5", tok_dir, args.device, dtype) if do_text else ""
        vae_dir = build_vae(vae_shape, tmp / "vae") if do_latents else ""
        setup_s = time.perf_counter() - t0

        cfg = ExtractConfig(dataset="sam", what=args.what, caption_set="bench", output_root=data["root"],
                            base_size=args.base_size, t5_model=t5_dir or "unused", vae_model=vae_dir or "unused",
                            text_batch_size=args.text_batch_size, decode_threads=args.decode_threads,
                            device=args.device, dtype=args.dtype, force=True)
        first = set(data["first_shard_keys"])
        cases: dict[str, Callable[[bool], int]] = {}
        out_dirs: dict[str, str] = {}
        n_tokens: list[int] = []
        if do_text:
            text = TextEncoder(t5_dir, max_tokens=MAX_TOKENS, device=args.device, dtype=args.dtype)
            n_tokens = [len(ids) for ids in text.tokenizer(list(data["captions"].values()), truncation=True,
                                                           max_length=MAX_TOKENS)["input_ids"]]
            official_txt = tmp / "official" / "t5"
            official_txt.mkdir(parents=True)
            items = sorted(data["captions"].items())
            cases["text official"] = lambda warm: official_text(
                [i for i in items if i[0] in first] if warm else items, text.tokenizer, text.model, text.device,
                official_txt, args.official_compress)
            cases["text project"] = lambda warm: sum(extract_text_shard(u, cfg, text).num_ok
                                                     for u in data["caption_urls"][:1 if warm else None])
            out_dirs.update({"text official": str(official_txt),
                             "text project": text_features_dir(data["root"], "sam", "bench")})
        if do_latents:
            vae = LatentEncoder(vae_dir, device=args.device, dtype=args.dtype)
            if vae.dtype == torch.float32:
                official_vae = vae.model
            else:
                from diffusers import AutoencoderKL

                official_vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
            official_lat = tmp / "official" / f"vae_{args.base_size}resolution" / "noflip"
            official_lat.mkdir(parents=True)
            cases["latents official"] = lambda warm: official_latents(
                [i for i in data["images"] if i[0] in first] if warm else data["images"], official_vae, device,
                args.base_size, official_lat)
            for bs in batch_sizes:
                lat_cfg = cfg.model_copy(update={"image_batch_size": bs})
                cases[f"latents project b{bs}"] = lambda warm, c=lat_cfg: sum(
                    extract_latent_shard(m, c, vae).num_ok for m in data["manifests"][:1 if warm else None])
            out_dirs["latents official"] = str(official_lat)
            out_dirs.update({f"latents project b{bs}": latents_dir(data["root"], "sam", args.base_size)
                             for bs in batch_sizes})
        times, counts = measure(cases, max(1, args.repeats))
        sizes = {name: dir_bytes(d) for name, d in out_dirs.items()}
        at_xxl = None
        if do_text and text.width != 4096:
            at_xxl = text_bytes_at_width(data, cfg, text.tokenizer, 4096, tmp)

    n = args.images
    assert all(c == n for c in counts.values()), counts  # every sample went through (a sanity check, not timing)
    words = [len(c.split()) for c in data["captions"].values()]
    print(f"{n} SA-1B images ({args.short_side} px short side, {args.shards} shards) + {n} captions; "
          f"T5 {t5_shape if do_text else '-'}, VAE {vae_shape if do_latents else '-'}; {args.device}, "
          f"{str(dtype).removeprefix('torch.')} (official VAE float32); latents {args.base_size}x{args.base_size}; "
          f"project: text batch {args.text_batch_size} (at most {-(-n // args.shards)} here: one shard at a time), "
          f"image batch N, {args.decode_threads} decode threads; "
          f"torch threads {torch.get_num_threads()}; setup {setup_s:.1f} s")
    if n_tokens:
        print(f"captions: {statistics.mean(words):.1f} words (min {min(words)}, max {max(words)}); T5 tokens with "
              f"EOS {statistics.mean(n_tokens):.1f} (min {min(n_tokens)}, max {max(n_tokens)}); "
              f"the official layout pads every caption to {MAX_TOKENS}")
    print(f"warm-up pass over the first shard, then {args.repeats} interleaved round(s); best time used\n")

    best = {name: min(ts) for name, ts in times.items()}
    median = {name: statistics.median(ts) for name, ts in times.items()}
    table = {name: (best[name], median[name], sizes[name]) for name in cases}
    if do_text and do_latents:
        for lat in [name for name in cases if name.startswith("latents ")]:
            both = "both " + lat.removeprefix("latents ")
            table[both] = (best["text " + both.split()[1]] + best[lat], median["text " + both.split()[1]]
                           + median[lat], sizes["text " + both.split()[1]] + sizes[lat])
    print(f"{'case':<21}{'best s':>9}{'median s':>10}{'samples/s':>11}{'vs official':>13}{'bytes/sample':>14}"
          f"{'vs official':>13}")
    for name, (t, med, size) in table.items():
        base_t, _, base_size = table[name.split()[0] + " official"]
        print(f"{name:<21}{t:>9.3f}{med:>10.3f}{n / t:>11.1f}{base_t / t:>12.2f}x{size / n:>14,.0f}"
              f"{size / base_size:>12.1%} ")
    kind = "both" if do_text and do_latents else ("text" if do_text else "latents")
    head = f"{kind} project" + (f" b{batch_sizes[0]}" if do_latents else "")
    speed = table[f"{kind} official"][0] / table[head][0]
    share = table[head][2] / table[f"{kind} official"][2]
    where = "at the timed T5's width"
    if at_xxl is not None:  # judge bytes where they matter: T5-XXL's width
        lat_p = sizes[f"latents project b{batch_sizes[0]}"] if do_latents else 0
        lat_o = sizes["latents official"] if do_latents else 0
        share, where = (at_xxl[0] + lat_p) / (at_xxl[1] + lat_o), "at T5-XXL width"
    if at_xxl is not None:
        proj, off = at_xxl
        line = f"text {proj / n:,.0f} vs official {off / n:,.0f} bytes/sample ({proj / off:.1%})"
        if do_latents:
            line += f"; text + latents {(proj + lat_p) / n:,.0f} vs {(off + lat_o) / n:,.0f} ({share:.1%})"
        print(f"\nbytes at T5-XXL width (4096; same captions, random features written by each layout's own code): "
              f"{line}")
    print(f"\n{head}: throughput {speed:.2f}x official (goal >= {THROUGHPUT_GOAL:g}x: "
          f"{'MET' if speed >= THROUGHPUT_GOAL else 'NOT MET'}); bytes {share:.1%} of official {where} "
          f"(goal <= {BYTES_GOAL:.0%}: {'MET' if share <= BYTES_GOAL else 'NOT MET'})")

if __name__ == "__main__":
    main()

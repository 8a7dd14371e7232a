"""Throughput of the bucketed training loader (`pixart.data.loader.BucketedLoader`) on one CPU core, against stock
webdataset and a raw read of the same tar bytes, measured in the same run.

Setup (untimed): --samples feature samples over --shards shards, written in the project's exact format by the project's
own code: a caption set (parquet + done markers) encoded by `extract_text_shard` with a stub encoder that returns
random fp16 [n_tokens, 4096] arrays (T5-XXL's width; n_tokens uniform in --min-tokens..--max-tokens), and latent shards
written by `pixart.features.extract.LatentShard` (accept + finish, as `extract_latent_shard` does after the VAE) from
synthetic manifests: random fp16 [8, h/8, w/8] posterior mean+std with the json metadata. Default: the fixed 256 px
bucket (8x32x32), so every batch fills; `--base-size 1024 --multi-scale` spreads samples over a few common SA-1B
aspect-ratio buckets instead (8x128x128 and similar). The page cache is warmed before timing.

Cases, one process, torch.set_num_threads(1), interleaved (order rotated each round), best of --repeats after an
untimed warm-up round:

    raw file read      read every tar (text + latents) sequentially, 1 MiB at a time: the byte-rate ceiling
    raw tarfile        tarfile.open(mode="r|") over every tar, reading each member's bytes
    wds latents        webdataset.WebDataset(latent tars, shardshuffle=False).decode(): every sample, npy decoded
                       by webdataset's default handlers (np.load), json parsed
    wds text           the same over the text tars (a second tar set: stock webdataset cannot join the two by key)
    wds text+latents   the sum of the two rows above: what stock webdataset costs to read both features (the
                       baseline of the "vs wds" column)
    output floor       no I/O: the same plan's batches built from memory ([B, 120, 4096] fp16 text from an array pool
                       as the loader's, the valid rows copied in and the rest zeroed, the mask, the posterior sampled
                       with per-sample seeded noise). Any loader delivering these batches spends at least this; it
                       bounds the "vs wds" ratio
    wds + collate      stock webdataset doing the loader's job, for reference: both tar sets read in step, the
                       posterior sampled, text padded to 120 fp16 + mask, per-bucket batches stacked
    loader             BucketedLoader(feature_shards(...), batch_size=--batch-size): every collated batch of an epoch:
                       latents sampled from the posterior (fp32, scaled), text padded to [B, 120, 4096] fp16 + mask
    loader, posterior out   the same with sample_posterior=False: the stored fp16 posterior and the per-sample
                       noise seeds instead of latents, for sampling in the training step on the GPU (half of what
                       data.finish=auto does on a GPU); the noise is not drawn on this core
    loader, GPU finishes    sample_posterior=False and pad_text=False: also the valid T5 rows back to back with
                       n_tokens instead of padded text + mask (no padding to zero; pixart.data.finish.pad_text
                       pads on the device): what data.finish=auto does in GPU training

Stock webdataset only decodes; the loader also joins text and latents by key, samples the posterior, pads the text
to 120 tokens and collates batches, so it does strictly more work per sample. Bytes/s count the bytes each case
reads: whole files for the raw reads and webdataset, each delivered sample's byte ranges (text + latent tar members)
for the loader. Aims: loader >= 3x stock webdataset (text+latents) in samples/s; loader bytes/s >= 30 % of the raw
file read. Nothing is asserted: a script, not a test. --profile prints the loader's top costs (cProfile).

    .venv/bin/python benchmarks/bench_loader.py [--samples 4096] [--shards 8] [--batch-size 32] [--repeats 3]
        [--base-size 256 | --base-size 1024 --multi-scale] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's packages, installed or not (a GPU box)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from captioning.records import CAPTION_SCHEMA  # noqa: E402
from pixart.buckets import bucket_table  # noqa: E402
from pixart.data.finish import SCALING_FACTOR, sample_posterior  # noqa: E402
from pixart.data.index import feature_shards, shard_entries
from pixart.data.loader import BucketedLoader  # noqa: E402
from pixart.data.tar_reads import ArrayPool  # noqa: E402
from pixart.features.config import ExtractConfig  # noqa: E402
from pixart.features.extract import LatentShard, bucket_of, extract_text_shard, latent_files_of, text_files_of  # noqa: E402
from storage.commit import write_done  # noqa: E402
from storage.layout import caption_url, manifest_url  # noqa: E402
from storage.manifest import write_manifest  # noqa: E402
from storage.parquet import read_rows, write_table  # noqa: E402

D_MODEL = 4096  # T5-XXL
MAX_TOKENS = 120
SPEED_GOAL = 3.0  # loader samples/s over stock webdataset's (text + latents)
BYTES_GOAL = 0.30  # loader bytes/s over the raw file read's
# (h/w of the source photo, share): SA-1B is mostly landscape 4:3 and 3:2, some portrait and square
MULTI_SCALE_MIX = ((0.75, 0.45), (0.67, 0.2), (1.0, 0.1), (1.33, 0.15), (0.56, 0.1))


class StubText:
    """Duck-types `pixart.features.encoders.TextEncoder` for `extract_text_shard`: random fp16 features of the token
    count
    the benchmark chose for each caption (the caption text carries it)."""

    def __init__(self, tokens: dict[str, int], seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.tokens = tokens
        self.pool = rng.standard_normal((16, MAX_TOKENS, D_MODEL), dtype=np.float32).astype(np.float16)
        self.calls = 0

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            self.calls += 1
            out.append(np.ascontiguousarray(self.pool[self.calls % len(self.pool), :self.tokens[text]]))
        return out


def source_size(rng: np.random.Generator, multi_scale: bool) -> tuple[int, int]:
    if not multi_scale:
        return 1500, 2250
    ratios, shares = zip(*MULTI_SCALE_MIX, strict=True)
    ratio = ratios[rng.choice(len(ratios), p=np.array(shares) / sum(shares))]
    return round(1500 * ratio) if ratio < 1 else 1500, 1500 if ratio < 1 else round(1500 / ratio)


def build_features(root: Path, samples: int, shards: int, min_tokens: int, max_tokens: int, base_size: int,
                   multi_scale: bool, seed: int) -> tuple[list[str], int]:
    """Caption + manifest inputs, then text and latent feature shards through the project's writers. Returns the
    tar paths and the total number of tokens."""
    rng = np.random.default_rng(seed)
    cfg = ExtractConfig(dataset="sam", caption_set="bench", output_root=str(root), base_size=base_size,
                        multi_scale=multi_scale, t5_model="stub/t5-xxl-width", vae_model="stub/sd-vae")
    tokens: dict[str, int] = {}
    latent_pool = rng.standard_normal((8, 8, base_size // 4, base_size // 4), dtype=np.float32).astype(np.float16)
    per = -(-samples // shards)
    tars = []
    for s in range(shards):
        name = f"sa_{s:06d}"
        keys = [f"sa_{226381 + 100_000 * s + i}" for i in range(min(per, samples - s * per))]
        rows = []
        for key in keys:
            h, w = source_size(rng, multi_scale)
            rows.append({"key": key, "dataset": "sam", "shard": name, "source_url": f"/nonexistent/{name}.tar",
                         "member": f"./{key}.jpg", "offset": 0, "width": w, "height": h, "bytes": 0,
                         "format": "JPEG", "status": "ok", "error": None})
        manifest = manifest_url(str(root), "sam", name)
        write_manifest(rows, manifest)
        write_done(manifest, {"stage": "ingest", "note": "synthetic, bench_loader"})
        caps = []
        for key in keys:
            text = f"caption of {key}"
            tokens[text] = int(rng.integers(min_tokens, max_tokens + 1))
            caps.append({"key": key, "caption": text, "text": text, "t5_tokens": tokens[text], "status": "ok"})
        caption = caption_url(str(root), "sam", "bench", name)
        write_table(caps, caption, CAPTION_SCHEMA)
        write_done(caption, {"stage": "caption", "note": "synthetic, bench_loader"})
        extract_text_shard(caption, cfg, StubText(tokens, seed + s))

        shard = LatentShard(manifest, cfg)
        try:
            for i, row in enumerate(shard.todo):
                bucket = bucket_of(row, cfg)
                crop = bucket.crop(row["height"], row["width"])
                lat = latent_pool[i % len(latent_pool), :, :bucket.height // 8, :bucket.width // 8]
                meta = {"bucket": bucket.key, "orig_hw": [row["height"], row["width"]],
                        "resized_hw": list(crop.resized), "crop_box": list(crop.box), "base_size": base_size}
                shard.accept({"keys": [row["key"]], "metas": [meta]}, lat[None, :4], lat[None, 4:])
        except BaseException as e:
            shard.abort(e)
            raise
        shard.finalize()
        tars += [latent_files_of(cfg, name).tar, text_files_of(cfg, name).tar]
    return tars, sum(tokens.values())


# ---------------------------------------------------------------------------------------------------------------------
# Cases: each returns (samples, bytes read)
# ---------------------------------------------------------------------------------------------------------------------


def raw_file_read(paths: list[str]) -> tuple[int, int]:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return 0, total


def raw_tarfile(paths: list[str]) -> tuple[int, int]:
    members = 0
    for p in paths:
        with open(p, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for info in tf:
                if info.isreg():
                    tf.extractfile(info).read()
                    members += 1
    return members, sum(Path(p).stat().st_size for p in paths)


def wds_read(paths: list[str]) -> tuple[int, int]:
    import webdataset as wds

    n = 0
    for sample in wds.WebDataset(paths, shardshuffle=False).decode():
        assert any(k.endswith("npy") for k in sample)  # decoded arrays are there (a sanity check)
        n += 1
    return n, sum(Path(p).stat().st_size for p in paths)


def wds_batches(latent_tars: list[str], text_tars: list[str], batch_size: int, scale: float) -> tuple[int, int]:
    """Stock webdataset doing the loader's job: both tar sets read in step (written in the same key order), the
    posterior sampled, text padded to 120 tokens (fp16, as stored and as the loader delivers it) with a mask, one
    bucket per batch, collated with torch.stack."""
    import webdataset as wds

    buffers: dict[str, list[dict]] = {}
    n = 0
    lat_ds = wds.WebDataset(latent_tars, shardshuffle=False).decode()
    txt_ds = wds.WebDataset(text_tars, shardshuffle=False).decode()
    for lat, txt in zip(lat_ds, txt_ds, strict=True):
        assert lat["__key__"] == txt["__key__"]
        mean, std = np.split(lat["latent.npy"].astype(np.float32), 2, axis=0)
        feats = txt["t5.npy"][:MAX_TOKENS]
        padded = np.zeros((MAX_TOKENS, feats.shape[1]), dtype=feats.dtype)  # as the loader: the stored fp16
        padded[:len(feats)] = feats
        mask = torch.zeros(MAX_TOKENS, dtype=torch.long)
        mask[:len(feats)] = 1
        meta = lat["json"]
        sample = {"latents": (torch.from_numpy(mean) + torch.from_numpy(std) * torch.randn(mean.shape)) * scale,
                  "text": torch.from_numpy(padded), "mask": mask,
                  "img_hw": torch.tensor(meta["orig_hw"], dtype=torch.float32),
                  "aspect_ratio": torch.tensor(float(meta["bucket"]), dtype=torch.float32)}
        buf = buffers.setdefault(meta["bucket"], [])
        buf.append(sample)
        if len(buf) == batch_size:
            batch = {k: torch.stack([x[k] for x in buf]) for k in buf[0]}
            n += len(batch["mask"])
            buffers[meta["bucket"]] = []
    return n, sum(Path(p).stat().st_size for p in latent_tars + text_tars)


def output_floor(shards: list, batch_size: int, seed: int, tokens: dict[str, int], base_size: int,
                 multi_scale: bool) -> tuple[int, int]:
    """The loader's outputs for the same plan built from memory, with no I/O or tar parsing: per batch, a
    [B, 120, d] fp16 text array from the same kind of pool as the loader's (valid rows copied in, the rest zeroed),
    the mask, and the posterior sampled from fp16 mean/std with per-sample seeded noise. What any loader that
    delivers these batches must at least spend."""
    loader = BucketedLoader(shards, batch_size=batch_size, seed=seed)
    source = np.random.default_rng(0).standard_normal((MAX_TOKENS, D_MODEL), dtype=np.float32).astype(np.float16)
    table = bucket_table(base_size) if multi_scale else {"1.0": (base_size, base_size)}
    arrays = ArrayPool()
    n = 0
    for entries in loader.plan():
        b = len(entries)
        text = arrays.empty((b, MAX_TOKENS, D_MODEL), np.dtype(np.float16))
        mask = np.zeros((b, MAX_TOKENS), dtype=np.int64)
        for i, e in enumerate(entries):
            rows = min(tokens[e.key], MAX_TOKENS)
            text[i, :rows] = source[:rows]
            text[i, rows:] = 0
            mask[i, :rows] = 1
        h, w = (x // 8 for x in table[entries[0].bucket])
        stored = torch.from_numpy(arrays.empty((b, 8, h, w), np.dtype(np.float16))).zero_()  # as if read
        seeds = torch.tensor([loader._noise_seed(e.key) for e in entries], dtype=torch.int64)
        batch = {"latents": sample_posterior(stored, seeds), "text": torch.from_numpy(text), "mask": mask}
        n += len(batch["mask"])
    return n, 0


def loader_read(shards: list, batch_size: int, seed: int, spans: dict[str, int],
                sample: bool = True, pad: bool = True) -> tuple[int, int]:
    """One epoch of a fresh loader (a loader iterated twice in one epoch resumes: it would skip every batch)."""
    n = total = 0
    for batch in BucketedLoader(shards, batch_size=batch_size, seed=seed, sample_posterior=sample, pad_text=pad):
        n += len(batch["keys"])
        total += sum(spans[k] for k in batch["keys"])
    return n, total


def measure(cases: dict[str, Callable[[], tuple[int, int]]], repeats: int):
    results = {name: fn() for name, fn in cases.items()}  # warm-up round (untimed)
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            results[name] = cases[name]()
            times[name].append(time.perf_counter() - start)
    return times, results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4096, help="feature samples in all (default 4096)")
    ap.add_argument("--shards", type=int, default=8, help="shards to spread them over (default 8)")
    ap.add_argument("--min-tokens", type=int, default=20, help="T5 tokens per caption, lower bound (default 20)")
    ap.add_argument("--max-tokens", type=int, default=120, help="upper bound, uniform in between (default 120)")
    ap.add_argument("--base-size", type=int, choices=(256, 512, 1024), default=256)
    ap.add_argument("--multi-scale", action="store_true", help="aspect-ratio buckets (base size 512 or 1024)")
    ap.add_argument("--batch-size", type=int, default=32, help="loader batch size (default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per case (default 3)")
    ap.add_argument("--profile", action="store_true", help="also print the loader's top costs (cProfile)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        t0 = time.perf_counter()
        tars, tokens = build_features(Path(tmp), args.samples, args.shards, args.min_tokens, args.max_tokens,
                                      args.base_size, args.multi_scale, args.seed)
        shards = feature_shards(tmp, "sam", args.base_size, args.multi_scale, caption_set="bench")
        spans = {}
        for i, shard in enumerate(shards):
            for e in shard_entries(i, shard):
                spans[e.key] = e.latent[1] + e.text[1]
        key_tokens = {r["key"]: r["n_tokens"] for s in shards for r in read_rows(s.text, ["key", "n_tokens"])}
        text_tars = [t for t in tars if "/text/" in t]
        latent_tars = [t for t in tars if "/latents/" in t]
        total_bytes = sum(Path(t).stat().st_size for t in tars)
        for t in tars:  # warm the page cache
            raw_file_read([t])
        setup_s = time.perf_counter() - t0
        cases = {"raw file read": lambda: raw_file_read(tars), "raw tarfile r|": lambda: raw_tarfile(tars),
                 "wds latents": lambda: wds_read(latent_tars), "wds text": lambda: wds_read(text_tars),
                 "wds + collate": lambda: wds_batches(latent_tars, text_tars, args.batch_size, SCALING_FACTOR),
                 "loader": lambda: loader_read(shards, args.batch_size, args.seed, spans),
                 "loader, posterior out": lambda: loader_read(shards, args.batch_size, args.seed, spans, False),
                 "loader, GPU finishes": lambda: loader_read(shards, args.batch_size, args.seed, spans, False, False),
                 "output floor": lambda: output_floor(shards, args.batch_size, args.seed, key_tokens,
                                                      args.base_size, args.multi_scale)}
        times, results = measure(cases, max(1, args.repeats))
        profile = None
        if args.profile:
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.runcall(loader_read, shards, args.batch_size, args.seed, spans)
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
            profile = out.getvalue()

    n = args.samples
    bucket_note = (f"fixed {args.base_size} bucket (latents 8x{args.base_size // 8}x{args.base_size // 8})"
                   if not args.multi_scale else f"{args.base_size}-ms buckets of sources with h/w "
                   f"{', '.join(f'{r} ({p:.0%})' for r, p in MULTI_SCALE_MIX)}")
    print(f"{n} samples in {args.shards} shards: T5 features [n_tokens, {D_MODEL}] fp16, n_tokens uniform "
          f"{args.min_tokens}-{args.max_tokens} (mean {tokens / n:.1f}); {bucket_note}; {len(tars)} tars, "
          f"{total_bytes / 1e6:.0f} MB; setup {setup_s:.1f} s")
    print(f"one process, torch threads 1, loader batch {args.batch_size} (drop_last: "
          f"{results['loader'][0]} samples delivered); warm-up round, then {args.repeats} interleaved round(s), "
          f"best time used\n")

    best = {name: min(ts) for name, ts in times.items()}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = {name: (best[name], med[name], results[name][0], results[name][1]) for name in cases}
    rows["wds text+latents"] = (best["wds text"] + best["wds latents"], med["wds text"] + med["wds latents"],
                                results["wds text"][0], results["wds text"][1] + results["wds latents"][1])
    rows = {k: rows[k] for k in ("raw file read", "raw tarfile r|", "wds latents", "wds text", "wds text+latents",
                                 "wds + collate", "loader", "loader, posterior out", "loader, GPU finishes",
                                 "output floor")}
    raw_rate = rows["raw file read"][3] / rows["raw file read"][0]
    wds_rate = rows["wds text+latents"][2] / rows["wds text+latents"][0]
    print(f"{'case':<22}{'best s':>9}{'median s':>10}{'samples/s':>11}{'vs wds':>9}{'MB/s':>9}{'vs raw MB/s':>13}")
    for name, (t, m, count, nbytes) in rows.items():
        rate = count / t if count and name != "raw tarfile r|" else None
        sps = f"{rate:>11.0f}" if rate else f"{'-':>11}"
        vs = f"{rate / wds_rate:>8.2f}x" if rate else f"{'-':>9}"
        print(f"{name:<22}{t:>9.3f}{m:>10.3f}{sps}{vs}{nbytes / 1e6 / t:>9.0f}{nbytes / t / raw_rate:>12.1%} ")
    lt, _, lcount, lbytes = rows["loader"]
    speed, share = lcount / lt / wds_rate, lbytes / lt / raw_rate
    print(f"\nloader (CPU finishes): {speed:.2f}x stock webdataset samples/s (goal >= {SPEED_GOAL:g}x: "
          f"{'MET' if speed >= SPEED_GOAL else 'NOT MET'}); {share:.1%} of the raw byte rate (goal >= "
          f"{BYTES_GOAL:.0%}: {'MET' if share >= BYTES_GOAL else 'NOT MET'})")
    floor = rows["output floor"][2] / rows["output floor"][0]
    print(f"loader: {lcount / lt / (rows['wds + collate'][2] / rows['wds + collate'][0]):.2f}x stock webdataset doing "
          f"the same job (wds + collate); {lcount / lt / floor:.0%} of the output floor ({floor:.0f} samples/s: the "
          f"batches alone, built from memory, bound any loader on this core)")
    pt, _, pcount, _ = rows["loader, posterior out"]
    print(f"loader, posterior out (sample_posterior=False: posterior + seeds, sampled in the training step on the "
          f"GPU): {pcount / pt / wds_rate:.2f}x stock webdataset")
    gt, _, gcount, gbytes = rows["loader, GPU finishes"]
    gspeed, gshare = gcount / gt / wds_rate, gbytes / gt / raw_rate
    met = lambda ok: "MET" if ok else "NOT MET"  # noqa: E731
    print(f"loader, GPU finishes (sample_posterior=False, pad_text=False: posterior + seeds and the valid T5 rows + "
          f"n_tokens, sampled and padded in the training step; data.finish=auto does this on a GPU): "
          f"{gspeed:.2f}x stock webdataset (goal >= {SPEED_GOAL:g}x: {met(gspeed >= SPEED_GOAL)}); "
          f"{gshare:.1%} of the raw byte rate (goal >= {BYTES_GOAL:.0%}: {met(gshare >= BYTES_GOAL)})")
    print("(raw tarfile r| counts members, not samples; the raw rows only bound the byte rate)")
    if profile:
        print("\nloader profile (one epoch, cProfile, by own time):\n" + profile)


if __name__ == "__main__":
    main()

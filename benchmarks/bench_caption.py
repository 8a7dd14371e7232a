"""Captioning throughput: images/s, generated tokens/s, and the share of wall time spent outside generate().

Builds SA-1B-format shards from real photos (short side 1500 px, as the released SA-1B), ingests them, and captions
them with `captioning.runner.CaptionRunner` (the code path of `pixart caption`, without Prefect). The time outside
generate() is everything the accelerator does not do: reading, decoding, padding, tokenizing, writing. Decoding
runs on CPU threads ahead of generation, so this share shows whether the accelerator is kept busy.

    .venv/bin/python benchmarks/bench_caption.py                       # tiny random LLaVA on CPU (built here)
    .venv/bin/python benchmarks/bench_caption.py --model llava-hf/llava-1.5-7b-hf --batch-size 32 --images 512
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captioning.captioner import Captioner  # noqa: E402
from captioning.config import CaptionConfig  # noqa: E402
from captioning.records import ensure_caption_set  # noqa: E402
from captioning.runner import CaptionRunner, caption_shard  # noqa: E402
from captioning.text import T5TokenCounter  # noqa: E402
from storage.config import IngestConfig  # noqa: E402
from storage.ingest import ingest_shard, list_shards  # noqa: E402
from storage.manifest import committed_manifests  # noqa: E402
from storage.samples import photo_variants, write_sa1b_tar  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model id or dir (default: a tiny random LLaVA built here)")
    ap.add_argument("--t5-tokenizer", default=None, help="tokenizer id or dir (default: a tiny one built here)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--short-side", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_caption_") as tmp:
        tmp = Path(tmp)
        model, t5 = args.model, args.t5_tokenizer
        if model is None or t5 is None:
            from captioning.tiny import make_tiny_llava, make_tiny_t5_tokenizer

            model = model or make_tiny_llava(tmp / "tiny-llava")
            t5 = t5 or make_tiny_t5_tokenizer(tmp / "tiny-t5")
        photos = photo_variants(min(args.images, 9), args.short_side)
        per = -(-args.images // args.shards)
        (tmp / "sa1b").mkdir()
        for s in range(args.shards):
            chunk = [photos[i % len(photos)] for i in range(s * per, min(args.images, (s + 1) * per))]
            write_sa1b_tar(tmp / "sa1b" / f"sa_{s:06d}.tar", chunk, first_id=1 + 100_000 * s, seed=s)
        icfg = IngestConfig(dataset="sam", source=str(tmp / "sa1b"), output_root=str(tmp / "out"))
        for shard in list_shards(icfg):
            ingest_shard(shard, icfg)

        cfg = CaptionConfig(dataset="sam", output_root=str(tmp / "out"), model=model, t5_tokenizer=t5,
                            batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                            generation={"max_new_tokens": args.max_new_tokens}, force=True)
        ensure_caption_set(cfg)
        t0 = time.perf_counter()
        captioner, counter = Captioner(cfg), T5TokenCounter(t5)
        load = time.perf_counter() - t0
        manifests = committed_manifests(cfg.output_root, "sam")
        caption_shard(manifests[0], cfg, captioner, counter)  # warm-up (first-call costs), not timed
        runner = CaptionRunner(cfg, captioner, counter)
        start = time.perf_counter()
        results = [runner.run(m, upcoming=manifests[i + 1] if i + 1 < len(manifests) else None)
                   for i, m in enumerate(manifests)]
        wall = time.perf_counter() - start
        runner.close()

    images = sum(r.num_ok for r in results)
    tokens = sum(r.generated_tokens for r in results)
    gen = sum(r.generate_seconds for r in results)
    print(f"model {cfg.model if args.model else 'tiny random LLaVA (32 px, 2 layers)'} on {captioner.device} "
          f"({captioner.dtype}); batch {args.batch_size}, max_new_tokens {args.max_new_tokens}; "
          f"{images} images of {args.short_side} px short side in {len(results)} shards; model load {load:.1f} s")
    print(f"images/s            {images / wall:10.2f}")
    print(f"generated tokens/s  {tokens / wall:10.1f}")
    print(f"wall s              {wall:10.2f}   generate() s {gen:.2f}")
    print(f"outside generate()  {1 - gen / wall:10.1%}   (goal on CPU with the tiny model: <= 10%)")


if __name__ == "__main__":
    main()

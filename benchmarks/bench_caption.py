"""Captioning throughput: images/s, generated tokens/s, ms per decode step, peak GPU memory, time outside the engine.

Builds SA-1B-format shards from real photos (short side 1500 px, as the released SA-1B), ingests them, and captions
them with `captioning.runner.CaptionRunner` (the code path of `pixart caption`, without Prefect), with the model
loaded through the project's `Captioner`. The time outside the engine is everything but `Captioner.generate()`:
reading, decoding, padding, tokenizing, writing. Decoding runs on CPU threads ahead of generation, so this share
shows whether the accelerator is kept busy.

    .venv/bin/python benchmarks/bench_caption.py                       # tiny random LLaVA on CPU (built here)
    .venv/bin/python benchmarks/bench_caption.py --shape llava-1.5-7b --layers 2 --images 4 --batch-size 2 \\
        --max-new-tokens 8 --lengths fixed,real --length-mean 5 --length-sd 2 --length-min 2   # CPU smoke test
    python3 benchmarks/bench_caption.py --shape llava-1.5-7b --lengths real,fixed --batch-size 32,64 \\
        --images 256 --shards 2 --max-new-tokens 300                  # on a GPU: see benchmarks/GPU.md
    .venv/bin/python benchmarks/bench_caption.py --model llava-hf/llava-1.5-7b-hf --batch-size 32 --images 512

Shapes (`--shape`, registry `SHAPES`): built from their configs with random weights, saved with `save_pretrained`
(model and processor) to a temporary directory and loaded back through `Captioner`, so no download is needed and
the real loading path is measured. On CUDA the model is built directly on the device in the benchmark's dtype.
- `tiny` (default): `captioning.tiny.make_tiny_llava` (32 px, 16 image tokens, 2-layer Llama), for CPU.
- `llava-1.5-7b`: CLIP ViT-L/14-336 (24 layers) + Llama-2-7B (32 layers, 32 heads of 128), 7.06B parameters; a
  CLIP processor at 336 px giving 576 image tokens and a 590-token prompt; a word-level tokenizer of 32,064
  synthetic words with `<image>` = 32000 and `<pad>` = 32001 as special tokens, which decodes any id the model
  emits. `--layers N` cuts both towers to N layers (at least 2 for the vision tower) while keeping every width,
  vocabulary and the prompt length: the code path at real widths, small enough for a CPU smoke test. Numbers
  with `--layers` are not the model's.

Engines (`--engine`, `CaptionConfig.engine`): `generate` (transformers' generate(), the reference) or `refill`
(`captioning.engine.RefillEngine`: `--refill-rows` rows decode together, refilled from the `--batch-size` images of
each call, so give it a batch size a few times the refill rows).

Caption lengths (`--lengths`, comma-separated to run several): random weights (almost) never emit
end-of-sequence, so every row would run to `--max-new-tokens`.
- `fixed`: every row runs to `--max-new-tokens` (the issue's "300 fixed new tokens"; the worst case).
- `real`: row i is stopped after a length drawn for it, through `Captioner.generate(inputs, stop_lengths=...)`,
  which forces end-of-sequence there, so that batching by finish time is measured. The lengths are log-normal
  with mean `--length-mean` 150 and standard deviation `--length-sd` 35 tokens (sigma 0.23, median 146), rounded
  and clipped to [`--length-min` 40, max_new_tokens]. They are drawn in row order from one numpy generator seeded
  with `--seed` per timed pass, so every image gets the same length whatever the batch size or engine. Why: issue
  9 puts LLaVA-1.5's answers to the detailed-description prompt at about 100-200 Llama tokens; a log-normal is
  positive and right-skewed, as text lengths are, and with these moments 95% of draws fall in 93-229 tokens and
  0.09% exceed 300 (clipped). The parameters are an assumption fitted to that range, not a measurement of
  LLaVA-1.5 captions: override them when a measured distribution is at hand.

Timing: before each timed pass, `--warmup-batches` full batches are generated at full length (`max_new_tokens`,
no stop lengths) outside the timed region, because a cold allocator triples the decode time (GPU notes). CUDA is
synchronized before each clock read. Reported per configuration:
- images/s and generated tokens/s over the wall time of the whole pass (shards in, caption parquet out);
- decode steps: batched one-token forward passes (prefills apart). engine=refill: the engine's own counter
  (`RefillEngine.stats.decode_steps`); engine=generate: per batch, the longest row's new tokens plus its
  end-of-sequence, less the one the prefill gave. ms per decode step is engine time over decode steps, so it
  includes the prefills and the vision tower; slot use is the tokens decode steps produced over (decode steps x
  rows decoded together), i.e. how much of each step went to rows that were still running;
- peak GPU memory: `torch.cuda.max_memory_allocated` during the timed pass ("n/a" on CPU), and the allocator's
  peak reservation beside it (what running out of memory is about);
- outside the engine: 1 - (time inside `Captioner.generate()`) / wall time.
The T5 token counter uses a tiny tokenizer built here unless `--t5-tokenizer` names one. On the 2-core CPU machine
torch's threads and the decoding threads contend for the cores, and other work on the machine shows in the numbers:
`OMP_NUM_THREADS=1` steadies them; compare CPU figures only within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from caption_shapes import SHAPES  # noqa: E402

from captioning.captioner import Caption, Captioner, resolve_device, resolve_dtype  # noqa: E402
from captioning.config import CaptionConfig  # noqa: E402
from captioning.records import ensure_caption_set  # noqa: E402
from captioning.runner import CaptionRunner  # noqa: E402
from captioning.text import T5TokenCounter  # noqa: E402
from storage.ingest.config import IngestConfig  # noqa: E402
from storage.ingest.samples import photo_variants, write_sa1b_tar  # noqa: E402
from storage.ingest.shard import ingest_shard, list_shards  # noqa: E402
from storage.manifest import committed_manifests  # noqa: E402

GiB = 2**30



# -- caption lengths ---------------------------------------------------------------------------------------------


@dataclass
class CaptionLengths:
    """Per-row stop lengths: None for `fixed` (run to max_new_tokens), seeded log-normal draws for `real`."""

    mode: str
    max_new_tokens: int
    mean: float = 150.0
    sd: float = 35.0
    low: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        sigma2 = math.log1p((self.sd / self.mean) ** 2)  # log-normal with this mean and standard deviation
        self.sigma, self.mu = math.sqrt(sigma2), math.log(self.mean) - sigma2 / 2
        self.rng = np.random.default_rng(self.seed)

    def describe(self) -> str:
        if self.mode == "fixed":
            return f"fixed {self.max_new_tokens}"
        low = min(self.low, self.max_new_tokens)
        return (f"real (log-normal mean {self.mean:g}, sd {self.sd:g}, clipped to [{low}, {self.max_new_tokens}], "
                f"seed {self.seed})")

    def draw(self, n: int) -> list[int] | None:
        if self.mode == "fixed":
            return None
        lengths = np.exp(self.mu + self.sigma * self.rng.standard_normal(n)).round()
        return [int(x) for x in np.clip(lengths, min(self.low, self.max_new_tokens), self.max_new_tokens)]


# -- the measured engine -----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MeteredCaptioner:
    """Stands in for the Captioner inside CaptionRunner: passes each batch its stop lengths and counts time
    (CUDA-synchronized), rows, generated tokens and decode steps of every `generate()`; the rest is delegated."""

    def __init__(self, captioner: Captioner, lengths: CaptionLengths) -> None:
        self.captioner, self.lengths = captioner, lengths
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = self.rows = self.tokens = self.steps = self.slot_steps = self.decoded = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.captioner, name)

    def caption_stream(self, inputs: Any, stop_lengths: list[int] | None = None) -> Any:
        raise NotImplementedError("bench_caption meters Captioner.generate() only: meter caption_stream() too "
                                  "before the runner uses it")

    def generate(self, inputs: Any, stop_lengths: list[int] | None = None) -> list[Caption]:
        n = len(inputs["input_ids"])
        stops = stop_lengths if stop_lengths is not None else self.lengths.draw(n)
        engine = getattr(self.captioner, "engine", None)  # RefillEngine (engine=refill) or None (generate())
        steps_before = engine.stats.decode_steps if engine is not None else 0
        device = self.captioner.device
        sync(device)
        start = time.perf_counter()
        captions = self.captioner.generate(inputs, stop_lengths=stops)
        sync(device)
        self.seconds += time.perf_counter() - start
        emitted = [c.n_tokens + (c.finish_reason == "stop") for c in captions]  # end-of-sequence is a step too
        if engine is not None:  # its own count of batched one-token forward passes (prefills apart)
            steps, slots = engine.stats.decode_steps - steps_before, min(engine.slots, n)
        else:  # generate(): the prefill gives every row its first token, then steps until the longest row ends
            steps, slots = max(emitted, default=1) - 1, n
        self.calls, self.rows, self.steps = self.calls + 1, self.rows + n, self.steps + steps
        self.tokens += sum(c.n_tokens for c in captions)
        self.decoded += sum(emitted) - len(emitted)  # tokens that came out of decode steps (not prefills)
        self.slot_steps += steps * slots
        return captions


# -- one measured configuration ----------------------------------------------------------------------------------


@dataclass
class Result:
    shape: str
    engine: str
    device: str
    dtype: str
    batch_size: int
    lengths: str
    max_new_tokens: int
    prompt_tokens: int
    images: int
    wall_s: float
    engine_s: float
    generated_tokens: int
    decode_steps: int
    decoded_tokens: int
    slot_steps: int
    peak_gpu_bytes: int | None
    peak_gpu_reserved_bytes: int | None
    derived: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.derived = {
            "images_per_s": self.images / self.wall_s,
            "tokens_per_s": self.generated_tokens / self.wall_s,
            "ms_per_decode_step": 1000 * self.engine_s / max(1, self.decode_steps),
            "tokens_per_image": self.generated_tokens / max(1, self.images),
            "slot_use": self.decoded_tokens / max(1, self.slot_steps),
            "outside_engine": 1 - self.engine_s / self.wall_s,
        }

    def report(self) -> str:
        d, peak = self.derived, self.peak_gpu_bytes
        return "\n".join([
            f"batch {self.batch_size}, lengths {self.lengths}, engine {self.engine}",
            f"  images/s             {d['images_per_s']:10.2f}   ({self.images} images in {self.wall_s:.2f} s)",
            f"  generated tokens/s   {d['tokens_per_s']:10.1f}   ({d['tokens_per_image']:.1f} per image)",
            f"  ms per decode step   {d['ms_per_decode_step']:10.2f}   ({self.decode_steps} steps, slot use "
            f"{d['slot_use']:.0%})",
            f"  peak GPU memory      {'n/a' if peak is None else f'{peak / GiB:.2f} GiB':>10}"
            + ("" if self.peak_gpu_reserved_bytes is None
               else f"   ({self.peak_gpu_reserved_bytes / GiB:.2f} GiB reserved by the allocator)"),
            f"  outside the engine   {d['outside_engine']:10.1%}   (engine {self.engine_s:.2f} s of "
            f"{self.wall_s:.2f} s)",
        ])


def prompt_length(captioner: Captioner, image: Any) -> int:
    return int(captioner.encode([captioner.prep.shrink(image)])["input_ids"].shape[1])


def measure(base: CaptionConfig, captioner: Captioner, counter: T5TokenCounter, manifests: list[str],
            warm_images: list[Any], batch_size: int, lengths: CaptionLengths, args: argparse.Namespace) -> Result:
    """Warm up at full length, then caption every shard once with the runner and count."""
    cfg = base.model_copy(update={"batch_size": batch_size})
    device = captioner.device
    for _ in range(args.warmup_batches):  # full length, no stop lengths: allocator and kernels warm at the peak
        batch = [captioner.prep.shrink(warm_images[i % len(warm_images)]) for i in range(batch_size)]
        captioner.generate(captioner.encode(batch))
    sync(device)
    metered = MeteredCaptioner(captioner, lengths)  # draws stop lengths from the start of its seeded sequence
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner = CaptionRunner(cfg, metered, counter)  # type: ignore[arg-type]  # duck-typed Captioner
    sync(device)
    start = time.perf_counter()
    try:
        results = [runner.run(m, upcoming=manifests[i + 1] if i + 1 < len(manifests) else None)
                   for i, m in enumerate(manifests)]
    finally:
        runner.close()
    sync(device)
    wall = time.perf_counter() - start
    images, cuda = sum(r.num_ok for r in results), device.type == "cuda"
    engine = cfg.engine if captioner.engine is None else f"{cfg.engine} ({captioner.engine.slots} rows)"
    return Result(shape=args.model or args.shape, engine=engine, device=str(device),
                  dtype=str(captioner.dtype).removeprefix("torch."), batch_size=batch_size,
                  lengths=lengths.describe(), max_new_tokens=args.max_new_tokens,
                  prompt_tokens=prompt_length(captioner, warm_images[0]), images=images, wall_s=wall,
                  engine_s=metered.seconds, generated_tokens=metered.tokens, decode_steps=metered.steps,
                  decoded_tokens=metered.decoded, slot_steps=metered.slot_steps,
                  peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
                  peak_gpu_reserved_bytes=torch.cuda.max_memory_reserved(device) if cuda else None)


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model built here (ignored with --model)")
    ap.add_argument("--layers", type=int, default=None, help="cut a real shape to N layers (CPU smoke test)")
    ap.add_argument("--model", default=None, help="model id or dir instead of a built --shape")
    ap.add_argument("--t5-tokenizer", default=None, help="tokenizer id or dir (default: a tiny one built here)")
    ap.add_argument("--engine", choices=["generate", "refill"], default="generate", help="CaptionConfig.engine")
    ap.add_argument("--refill-rows", type=int, default=None,
                    help="engine=refill: rows decoded together (CaptionConfig.refill_rows; default batch size)")
    ap.add_argument("--lengths", type=_csv(str), default=["fixed"], help="fixed | real, comma-separated")
    ap.add_argument("--length-mean", type=float, default=150.0)
    ap.add_argument("--length-sd", type=float, default=35.0)
    ap.add_argument("--length-min", type=int, default=40, help="--lengths real: shortest caption (clip)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the --lengths real draws")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--short-side", type=int, default=1500)
    ap.add_argument("--batch-size", type=_csv(int), default=[16], help="comma-separated to run several")
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--warmup-batches", type=int, default=1, help="full-length batches before each timed pass")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if bad := sorted(set(args.lengths) - {"fixed", "real"}):
        raise SystemExit(f"--lengths takes fixed and/or real, not {', '.join(bad)}")
    if args.engine == "refill" and args.refill_rows is None and len(args.batch_size) > 1:
        raise SystemExit("--engine refill with several batch sizes needs --refill-rows (the engine's rows are set "
                         "once, when the Captioner loads)")

    with tempfile.TemporaryDirectory(prefix="bench_caption_") as tmp:
        tmp = Path(tmp)
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        t0 = time.perf_counter()
        if args.model is None:
            what = SHAPES[args.shape].build(tmp / "model", device, dtype, args.layers)
            model = str(tmp / "model")
        else:
            what, model = args.model, args.model
        t5 = args.t5_tokenizer
        if t5 is None:
            from captioning.tiny import make_tiny_t5_tokenizer

            t5 = make_tiny_t5_tokenizer(tmp / "tiny-t5")
        built = time.perf_counter() - t0

        photos = photo_variants(min(args.images, 9), args.short_side)
        per = -(-args.images // args.shards)
        (tmp / "sa1b").mkdir()
        for s in range(args.shards):
            chunk = [photos[i % len(photos)] for i in range(s * per, min(args.images, (s + 1) * per))]
            if chunk:
                write_sa1b_tar(tmp / "sa1b" / f"sa_{s:06d}.tar", chunk, first_id=1 + 100_000 * s, seed=s)
        icfg = IngestConfig(dataset="sam", source=str(tmp / "sa1b"), output_root=str(tmp / "out"))
        for shard in list_shards(icfg):
            ingest_shard(shard, icfg)

        cfg = CaptionConfig(dataset="sam", output_root=str(tmp / "out"), model=model, t5_tokenizer=t5,
                            batch_size=args.batch_size[0], device=args.device, dtype=args.dtype,
                            generation={"max_new_tokens": args.max_new_tokens}, force=True, engine=args.engine,
                            refill_rows=args.refill_rows)
        ensure_caption_set(cfg)
        t0 = time.perf_counter()
        captioner, counter = Captioner(cfg), T5TokenCounter(t5)
        load = time.perf_counter() - t0
        manifests = committed_manifests(cfg.output_root, "sam")
        gpu = torch.cuda.get_device_name(captioner.device) if captioner.device.type == "cuda" else "CPU"
        print(f"model {what}\n  on {captioner.device} ({gpu}, {str(captioner.dtype).removeprefix('torch.')}); "
              f"torch {torch.__version__}; built and saved in {built:.1f} s, loaded by Captioner in {load:.1f} s; "
              f"{args.images} images of {args.short_side} px short side in {len(manifests)} shards; "
              f"max_new_tokens {args.max_new_tokens}; prompt {prompt_length(captioner, photos[0])} tokens",
              flush=True)

        setup = {"model": what, "device": str(captioner.device), "gpu": gpu, "dtype": str(captioner.dtype),
                 "torch": torch.__version__, "build_s": built, "load_s": load, "shards": len(manifests),
                 "short_side": args.short_side}
        results = []
        for batch_size in args.batch_size:
            for mode in args.lengths:
                lengths = CaptionLengths(mode, args.max_new_tokens, args.length_mean, args.length_sd,
                                         args.length_min, args.seed)
                result = measure(cfg, captioner, counter, manifests, photos, batch_size, lengths, args)
                results.append(result)
                print(result.report(), flush=True)

    print(f"\n{'engine':20s} batch  lengths  images/s  tokens/s  ms/step  peak GiB  outside")
    for r in results:
        d = r.derived
        peak = "n/a" if r.peak_gpu_bytes is None else f"{r.peak_gpu_bytes / GiB:.1f}"
        print(f"{r.engine:20s} {r.batch_size:5d}  {r.lengths.split()[0]:7s}  {d['images_per_s']:8.2f}  "
              f"{d['tokens_per_s']:8.1f}  {d['ms_per_decode_step']:7.2f}  {peak:>8}  {d['outside_engine']:7.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": setup, "results": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    main()

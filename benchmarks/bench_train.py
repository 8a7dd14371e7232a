"""The project's training step (loader + Trainer.train_step) against a bare loop with the same diffusers model,
the same batch size and the same loss, in one run.

Setup (untimed): T5-XXL-shaped feature shards (4096 wide, 20-120 tokens) and 256 px latents written by the project's
own code (benchmarks/bench_loader.py's builder), a stage-2 TrainConfig on them. Cases, interleaved (order rotated
each round), best of --repeats after a warm-up round:

    bare loop   one collated batch already in memory (device-resident), then per step: t and noise, q_sample, the
                model (pixart_forward), the IDDPM hybrid loss, backward, clip, AdamW, the warm-up schedule
    project     Trainer.train_step on the BucketedLoader's batches: the same math plus reading and collating each
                batch, caption dropout, seeded per-step randomness, the NaN check and the metrics

The ratio project / bare is the cost of everything the project adds (goal >= 0.95 on CPU with a small preset).
Nothing is asserted: a script, not a test.

On a GPU it also prints the model FLOP utilisation by the issue's estimate (6 x parameters x image tokens x
samples/s over the card's dense bf16 peak: 989 TFLOP/s for an H100 or H200, else --peak-tflops) and the GPU-hours
each paper stage at that resolution would take at the project's rate (samples from the paper's Table 4 schedule).
There the batches are finished in the step (data.finish=auto: latents sampled from the posterior, T5 padded), in
both cases.

    .venv/bin/python benchmarks/bench_train.py [--preset pixart-small] [--batch-size 8] [--steps 6] [--repeats 3]
    # on a GPU (no downloads: real shapes, random weights)
    python benchmarks/bench_train.py --preset pixart-xl-2 --device cuda --batch-size 64 --steps 20 [--compile]
        [--base-size 256|512|1024]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]  # uninstalled too

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_loader import build_features  # noqa: E402

from pixart.data.finish import pad_text, sample_posterior  # noqa: E402
from pixart.models import pixart_forward  # noqa: E402
from pixart.train.conditions import Conditions  # noqa: E402
from pixart.train.config import TrainConfig  # noqa: E402
from pixart.train.trainer import Trainer  # noqa: E402

GOAL = 0.95
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 (SXM), by device name
# samples each paper stage sees (Table 4: steps x global batch), by the resolution it trains at
PAPER_SAMPLES = {256: {"1: ImageNet 256 (DiT-XL/2, a similar size)": 300e3 * 1024, "2: SAM 256": 150e3 * 11392,
                       "3: HQ 256": 90e3 * 11392},
                 512: {"3: HQ 512": 100e3 * 2560}, 1024: {"3: HQ 1024 multi-scale": 16e3 * 384}}


def write_conditions(cfg: TrainConfig, width: int) -> None:
    """The run's null caption and prompts without a T5 (random, T5-shaped): what prepare_run would write."""
    null = np.random.default_rng(0).standard_normal((1, width), dtype=np.float32).astype(np.float16)
    Conditions.from_features([null] * (1 + len(cfg.schedule.sample_prompts)), cfg.data.max_tokens).save(cfg)
    assert Conditions.load(cfg) is not None


def bare_steps(trainer: Trainer, batch: dict, steps: int) -> int:
    """The same model, optimizer and loss as `trainer`, on one device-resident batch."""
    model, opt, sched, diff = trainer.forward_model, trainer.optimizer, trainer.scheduler, trainer.diffusion
    dev = trainer.device
    x0 = (batch["latents"].to(dev) if "latents" in batch
          else sample_posterior(batch["posterior"].to(dev), batch["noise_seed"]))
    if "text" in batch:
        text, mask = batch["text"].to(dev).float(), batch["mask"].to(dev)
    else:
        text, mask = pad_text(batch["text_rows"].to(dev), batch["n_tokens"], trainer.loader.max_tokens)
        text = text.float()
    n = x0.shape[0]
    for _ in range(steps):
        t = torch.randint(0, 1000, (n,))  # drawn on the host, as the project does: it knows when no t is 0
        any_t0 = bool((t == 0).any())
        t, noise = t.to(dev), torch.randn_like(x0)
        x_t = diff.q_sample(x0, t, noise)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=trainer.autocast):
            out = pixart_forward(model, x_t, t, text, mask)
        loss = diff.training_losses(out.float(), x0, x_t, t, noise, any_t0=any_t0)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return steps * n


def project_steps(trainer: Trainer, batches, steps: int) -> int:
    n = 0
    for _ in range(steps):
        trainer.train_step(next(batches))
        n += trainer.cfg.data.batch_size
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pixart-small", help="model preset (default pixart-small)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per case per round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=512, help="feature samples written (loader input)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--base-size", type=int, choices=(256, 512, 1024), default=256, help="resolution (square)")
    ap.add_argument("--compile", action="store_true", help="model.compile=true (torch.compile), both cases")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    ap.add_argument("--finish", choices=("auto", "loader", "device"), default="auto",
                    help="data.finish: where batches are finished, latents sampled and T5 padded (auto: in the "
                         "step on a GPU, the loader on CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        build_features(Path(tmp), args.samples, 4, 20, 120, args.base_size, False, 0)
        cfg = TrainConfig.model_validate({
            "stage": 2, "run": "bench", "output_root": tmp, "model": {"preset": args.preset, "compile": args.compile},
            "data": {"dataset": "sam", "caption_set": "bench", "base_size": args.base_size,
                     "batch_size": args.batch_size, "finish": args.finish},
            "optim": {"ema_decay": None, "warmup_steps": 10}, "schedule": {"max_steps": 10**6},
            "device": args.device})
        write_conditions(cfg, 4096)
        trainer = Trainer(cfg)
        batches = trainer.batches()
        fixed = next(batches)
        cases = {"bare loop": lambda: bare_steps(trainer, fixed, args.steps),
                 "project": lambda: project_steps(trainer, batches, args.steps)}
        for fn in cases.values():  # warm-up (allocator, kernels)
            fn()
        times: dict[str, list[float]] = {k: [] for k in cases}
        names = list(cases)
        for r in range(args.repeats):
            for name in names[r % 2:] + names[:r % 2]:
                start = time.perf_counter()
                samples = cases[name]()
                times[name].append(samples / (time.perf_counter() - start))
    params = sum(p.numel() for p in trainer.model.parameters())
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{args.preset} ({params / 1e6:.2f}M params) at {args.base_size} px, batch {args.batch_size}, T5 features "
          f"4096 wide{', torch.compile' if args.compile else ''}; device {args.device} ({name}), torch threads "
          f"{torch.get_num_threads()}; {args.steps} steps per case per round, best of {args.repeats}\n")
    best = {k: max(v) for k, v in times.items()}
    for case, rate in best.items():
        print(f"{case:<10} {rate:>9.2f} samples/s   rounds: {', '.join(f'{x:.2f}' for x in times[case])}")
    ratio = best["project"] / best["bare loop"]
    print(f"\nproject / bare loop: {ratio:.3f} (goal >= {GOAL}: {'MET' if ratio >= GOAL else 'NOT MET'})")
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    tokens = (args.base_size // 8 // 2) ** 2  # latent / patch 2
    if peak:
        for case, rate in best.items():
            print(f"{case}: MFU {6 * params * tokens * rate / (peak * 1e12):.1%} (6 x {params / 1e6:.1f}M x {tokens} "
                  f"tokens x {rate:.1f} samples/s over {peak:g} TFLOP/s)")
        if args.base_size == 256:
            print(f"project: {best['project']:.0f} samples/s against the goal of 420 (40 % MFU on an H100): "
                  f"{'MET' if best['project'] >= 420 else 'NOT MET'}")
    for stage, samples in PAPER_SAMPLES[args.base_size].items() if args.preset == "pixart-xl-2" else ():
        print(f"paper stage {stage}: {samples / 1e6:.0f}M samples = {samples / best['project'] / 3600:.0f} "
              f"{name}-hours at the project's rate")


if __name__ == "__main__":
    main()

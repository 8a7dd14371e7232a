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

    .venv/bin/python benchmarks/bench_train.py [--preset pixart-small] [--batch-size 8] [--steps 6] [--repeats 3]
    # on a GPU (no downloads: real shapes, random weights)
    python benchmarks/bench_train.py --preset pixart-xl-2 --device cuda --batch-size 64 --steps 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_loader import build_features  # noqa: E402

from pixart.conditions import Conditions  # noqa: E402
from pixart.models import pixart_forward  # noqa: E402
from pixart.train_config import TrainConfig  # noqa: E402
from pixart.trainer import Trainer  # noqa: E402

GOAL = 0.95


def write_conditions(cfg: TrainConfig, width: int) -> None:
    """The run's null caption and prompts without a T5 (random, T5-shaped): what prepare_run would write."""
    null = np.random.default_rng(0).standard_normal((1, width), dtype=np.float32).astype(np.float16)
    Conditions.from_features([null] * (1 + len(cfg.schedule.sample_prompts)), cfg.data.max_tokens).save(cfg)
    assert Conditions.load(cfg) is not None


def bare_steps(trainer: Trainer, batch: dict, steps: int) -> int:
    """The same model, optimizer and loss as `trainer`, on one device-resident batch."""
    model, opt, sched, diff = trainer.model, trainer.optimizer, trainer.scheduler, trainer.diffusion
    dev = trainer.device
    x0, text, mask = batch["latents"].to(dev), batch["text"].to(dev).float(), batch["mask"].to(dev)
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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        build_features(Path(tmp), args.samples, 4, 20, 120, 256, False, 0)
        cfg = TrainConfig.model_validate({
            "stage": 2, "run": "bench", "output_root": tmp, "model": {"preset": args.preset},
            "data": {"dataset": "sam", "caption_set": "bench", "base_size": 256, "batch_size": args.batch_size},
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
    print(f"{args.preset} ({params / 1e6:.2f}M params) at 256 px, batch {args.batch_size}, T5 features 4096 wide; "
          f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), torch "
          f"threads {torch.get_num_threads()}; {args.steps} steps per case per round, best of {args.repeats}\n")
    best = {k: max(v) for k, v in times.items()}
    for name, rate in best.items():
        print(f"{name:<10} {rate:>9.2f} samples/s   rounds: {', '.join(f'{x:.2f}' for x in times[name])}")
    ratio = best["project"] / best["bare loop"]
    print(f"\nproject / bare loop: {ratio:.3f} (goal >= {GOAL}: {'MET' if ratio >= GOAL else 'NOT MET'})")


if __name__ == "__main__":
    main()

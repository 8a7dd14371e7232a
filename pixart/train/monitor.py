"""What a run leaves for people to watch: metrics.jsonl, a loss curve, and a cost summary in GPU-hours.

    runs/<run>/metrics.jsonl    one JSON line per logged step: loss, mse, vb, grad_norm, lr, samples_per_s, step_s,
                                gpu_hours (cumulative, all workers)
    runs/<run>/loss.png         loss per step (and its running mean)
    runs/<run>/summary.json     steps, samples seen, GPU-hours, and the paper's figure for the stage

metrics.jsonl is flushed before every checkpoint is saved (pixart/train/run.py), so the steps of a committed checkpoint
are always in it. On resume, lines past the resumed step are dropped: a run that crashed after logging steps it
never checkpointed redoes them, and the file stays the history of the weights that exist, each step once.
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image, ImageDraw

from storage.commit import write_atomic
from storage.layout import run_dir
from storage.urls import exists, join, open_url

# Paper Table 4: V100-days per stage, and per step of stage 3 (the whole stage 3: HQ 256 + 512 + 1024 multi-scale)
PAPER_V100_DAYS = {1: 88, 2: 672, 3: 416 + 320 + 160, "hq256": 416, "hq512": 320, "ms1024": 160}


def metrics_url(root: str, run: str) -> str:
    return join(run_dir(root, run), "metrics.jsonl")


def loss_plot_url(root: str, run: str) -> str:
    return join(run_dir(root, run), "loss.png")


def summary_url(root: str, run: str) -> str:
    """`summary.json`: the run's cost summary (GPU-hours, samples per second), written when it finishes."""
    return join(run_dir(root, run), "summary.json")


class MetricsLog:
    def __init__(self, root: str, run: str, resumed_step: int) -> None:
        self.root, self.run, self.url = root, run, metrics_url(root, run)
        self.rows: list[dict[str, Any]] = []
        if exists(self.url):
            with open_url(self.url, "rb") as f:
                self.rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
            self.rows = [r for r in self.rows if r["step"] <= resumed_step]
        self.flush()

    def append(self, metrics: dict[str, Any]) -> None:
        self.rows.append({k: (round(v, 8) if isinstance(v, float) else v) for k, v in metrics.items()})

    def flush(self) -> None:
        write_atomic(self.url, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows).encode())

    def finish(self, stage: int, stage_step: str | None = None) -> dict[str, Any]:
        self.flush()
        write_atomic(loss_plot_url(self.root, self.run), loss_curve_png(self.rows))
        summary = cost_summary(self.rows, stage, stage_step)
        write_atomic(summary_url(self.root, self.run), json.dumps(summary, indent=1).encode())
        return summary


def cost_summary(rows: list[dict[str, Any]], stage: int, stage_step: str | None = None) -> dict[str, Any]:
    """The run's cost next to the paper's for its stage (or, in stage 3, its step)."""
    last = rows[-1] if rows else {}
    paper = PAPER_V100_DAYS[stage_step or stage]
    rates = [r["samples_per_s"] for r in rows[len(rows) // 10:]] if rows else []  # skip warm-up steps
    return {"stage": stage, "stage_step": stage_step, "steps": last.get("step", 0),
            "gpu_hours": last.get("gpu_hours", 0.0), "final_loss": last.get("loss"),
            "mean_samples_per_s": sum(rates) / len(rates) if rates else None,
            "paper_v100_days": paper, "paper_v100_hours": paper * 24}


def loss_curve_png(rows: list[dict[str, Any]], width: int = 640, height: int = 360) -> bytes:
    """The loss per logged step and a running mean over 1/20 of the points, drawn with Pillow."""
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    pad = 40
    draw.rectangle([pad, 10, width - 10, height - pad], outline="black")
    points = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    if points:
        steps, losses = zip(*points, strict=True)
        lo, hi = min(losses), max(losses)
        span_y, span_x = (hi - lo) or 1.0, (steps[-1] - steps[0]) or 1

        def xy(s: float, v: float) -> tuple[float, float]:
            return (pad + (s - steps[0]) / span_x * (width - pad - 10),
                    height - pad - (v - lo) / span_y * (height - pad - 10))

        draw.line([xy(s, v) for s, v in points], fill=(150, 170, 230), width=1)
        k = max(1, len(points) // 20)
        smooth = [(steps[i], sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]))
                  for i in range(len(points))]
        draw.line([xy(s, v) for s, v in smooth], fill=(200, 30, 30), width=2)
        draw.text((pad + 4, 12), f"loss {hi:.4g}", fill="black")
        draw.text((pad + 4, height - pad - 14), f"{lo:.4g}", fill="black")
        draw.text((pad, height - pad + 6), f"step {steps[0]}", fill="black")
        draw.text((width - 110, height - pad + 6), f"step {steps[-1]}", fill="black")
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()

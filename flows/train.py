"""Prefect flow `train`: one PixArt-alpha training stage, locally or on Ray Train.

    prefect deployment run train/train-stage2 -p init=/data/pixart/runs/stage1-imagenet-256 \
        -p overrides='["data.caption_set=llava-1-5-7b-hf-1a2b3c4d", "output_root=/data/pixart"]'

Stage 3 is three deployments, run in order, each from the previous run's directory: train-stage3-hq256 (256),
train-stage3-hq512 (512), train-stage3-ms1024 (1024 multi-scale).

The work is `flows/train_stage.py` on the stage kit (`flows/_stage.py`), the same code `pixart train` runs locally:
the run is one task, retried for transient errors only; a retry (or a re-run with the same run name) resumes from
the run's latest checkpoint. Artifacts: `train-<run>-progress` (steps logged), `train-<run>-samples` (the last
sample grid), `train-<run>-cost` (GPU-hours next to the paper's) and the kit's `train-<run>-shards` (the run's one
row).
"""

from __future__ import annotations

from prefect import flow

from flows._prefect import run_as_flow
from flows.train_stage import TrainStage


@flow(name="train", validate_parameters=True)
def train(config: str = "train/stage2", init: str | None = None, overrides: list[str] | None = None):
    """Train one stage to its max_steps.

    Args:
        config: preset (`stage1`, `stage2`, stage 3's steps `stage3-256`, `stage3-512`, `stage3-1024`,
            `tiny-stage*`) or a YAML path.
        init: the previous stage's run directory (its latest committed checkpoint), checkpoint or export, or a DiT
            (stage 2: re-parameterised); None: the preset's. `init_weights=model|ema` (an override) picks which
            weights of it.
        overrides: `key=value` strings, e.g. `data.caption_set=<name>`, `ray.num_workers=64`.
    """
    return run_as_flow(TrainStage(), config, [*(overrides or []), *([f"init={init}"] if init else [])], False)

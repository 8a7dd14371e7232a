"""The training stage on the stage kit (flows/_stage.py): one run is the stage's one unit of work.

    outcome = run_stage(TrainStage(), "stage2", ["data.caption_set=..."], False, runtime)  # the `train` flow
    summary = run_training(cfg, log=print, progress=...)                                   # `pixart train`

The kit loads the config, maps errors, reports progress, publishes artifacts and summarises, as for every stage;
what is the stage's own:
- `shards`: takes the run's lease (`runs/<run>.lease`, storage/lease.py), held to the end, so two runs of one name
  never write (or prune) the same checkpoints; with it held, sweeps the checkpoint temporaries of a killed save;
  checks the run (`check_run`); returns the run as its one shard;
- `open`: locally, builds the trainer and resumes it. Nothing of the run is written before: a run that cannot start
  (a bad init, too large a batch) leaves nothing behind;
- `run_shard`: writes the conditions and config.yaml, then trains here (pixart/train/run.py) or on Ray Train
  (flows/_ray_train.py, which encodes the conditions in a Ray task first); returns the cost summary. A retry of a
  transient error (the Prefect task's) builds a new trainer, which resumes from the latest checkpoint;
- `finish`: the artifacts `train-<run>-samples` (the latest grid) and `train-<run>-cost`; `-progress` follows the
  logged steps (from metrics.jsonl on Ray);
- with `log_steps` (the `train` flow), each logged step (every schedule.log_every) as a `step_line` in the runtime's
  log, the Prefect run's logs: locally as it is trained, on Ray as the workers flush metrics.jsonl (at each
  checkpoint and at the end), read every WATCH_SECONDS.

`pixart train` runs it in the calling thread (Ctrl-C stops it at once) without retries (a re-run resumes), its lines
through `log`, and raises the run's error as itself. Nothing here imports Ray unless executor=ray.
"""

from __future__ import annotations

import base64
import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from flows._stage import Runtime, Shard, Stage, StageOutcome, failure_message, local_gpus, run_stage
from pixart.train.config import TrainConfig
from pixart.train.monitor import loss_plot_url, metrics_url, summary_url
from pixart.train.prepare import check_run, prepare_conditions, with_recorded_encoders, write_config
from storage.configio import load_config
from storage.errors import PipelineError, ShardBusyError
from storage.layout import run_dir, samples_dir
from storage.lease import Lease
from storage.urls import exists, filesystem, open_url

WATCH_SECONDS = 15  # how often progress is read from metrics.jsonl while the steps run on Ray


class RunBusyError(PipelineError):
    """Another live process is running a run of the same name."""


def load_train_config(config: str, overrides: list[str] | None = None, init: str | None = None) -> TrainConfig:
    """The run's config; t5_model and vae_model, when not given, are the ones the features record."""
    extra = list(overrides or []) + ([f"init={init}"] if init else [])
    return with_recorded_encoders(load_config(TrainConfig, config, extra, kind="train"))


def run_lease(cfg: TrainConfig) -> Lease:
    """The run's lease: `<output_root>/runs/<run>.lease`."""
    return Lease(run_dir(cfg.output_root, cfg.run))


# ---------------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------------


def step_line(metrics: dict[str, Any], max_steps: int) -> str:
    """One logged step for people: `step 20/100: loss 0.1234, grad_norm 1.2, lr 2e-05, 35.1 samples/s`."""
    return (f"step {metrics['step']}/{max_steps}: loss {metrics['loss']:.4f}, grad_norm {metrics['grad_norm']:.3g}, "
            f"lr {metrics['lr']:.3g}, {metrics['samples_per_s']:.1f} samples/s")


class TrainStage(Stage):
    """`cfg`: a config already loaded (`pixart train` loads it to pick the preset); else `load` reads one.
    `on_step(metrics)`: called after each logged step (on Ray, as metrics.jsonl is read back). `log_steps`: also
    write each logged step's `step_line` to the runtime's log (the Prefect run logger under the `train` flow)."""

    name = "train"

    def __init__(self, cfg: TrainConfig | None = None,
                 on_step: Callable[[dict[str, Any]], None] | None = None, log_steps: bool = False) -> None:
        self.cfg, self.on_step, self.log_steps = cfg, on_step, log_steps
        self.reported = 0  # the last logged step passed to on_step / the log (Ray: read back from metrics.jsonl)
        self.lease: Lease | None = None
        self.found: dict[str, Any] = {}
        self.log: Callable[[str], None] = print
        self.runtime: Runtime | None = None
        self.trainer = self.conditions = None  # a local run's, built by `open`
        self.before: dict[str, Any] = {}  # the latest checkpoint's trainer state when the run starts
        self.summary: dict[str, Any] = {}
        self.error: BaseException | None = None

    def load(self, config: str, overrides: list[str]) -> TrainConfig:
        return self.cfg if self.cfg is not None else load_train_config(config, overrides)

    def output_dir(self, cfg: TrainConfig) -> str:
        return run_dir(cfg.output_root, cfg.run)

    def gpu_slots(self, cfg: TrainConfig) -> int:
        return local_gpus(cfg)

    def shards(self, cfg: TrainConfig, log: Callable[[str], None]) -> list[Shard]:
        from pixart.train import checkpoint

        self.log = log
        lease = run_lease(cfg)
        try:
            lease.acquire()
        except ShardBusyError as e:
            raise RunBusyError(f"run {cfg.run} is running in another process ({e}); wait for it to end, or choose "
                               "another run name") from None
        self.lease = lease
        swept = checkpoint.sweep_temporaries(cfg.output_root, cfg.run)
        if swept:
            log(f"run {cfg.run}: removed {len(swept)} checkpoint temporaries of a killed save: {', '.join(swept)}")
        # refuses contradicting presets before any worker (or GPU) starts; on Ray the conditions are encoded in a task
        self.found = check_run(cfg)
        log(f"stage {cfg.stage} run {cfg.run}: {self.found['shards']} feature shards of {cfg.data.dataset}, "
            f"{cfg.model.preset} at {cfg.resolution}{' multi-scale' if cfg.data.multi_scale else ''}, "
            f"{cfg.schedule.max_steps} steps, executor {cfg.executor}; metrics: "
            f"{metrics_url(cfg.output_root, cfg.run)}")
        self.before = _latest_state(cfg)
        return [Shard(cfg.run, cfg)]

    def open(self, cfg: TrainConfig) -> None:
        if cfg.executor == "local":
            self.trainer = self._trainer(cfg)

    def close(self) -> None:
        self.trainer = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def run_all(self, cfg: TrainConfig, shards: list[Shard], runtime: Runtime, on_done) -> None:
        """The one run on the runtime (Ray Train, when executor=ray, is started from inside it); the run's
        artifacts are named by the run, not by a dataset."""
        runtime.key = f"train-{cfg.run}".lower()
        self.runtime = runtime

        def done(shard: Shard, result: dict[str, Any] | None, err: BaseException | None) -> None:
            self.error = err
            on_done(shard, result, err)

        runtime.run_shards(self, cfg, shards, done)

    def run_shard(self, shard: Shard, cfg: TrainConfig, progress: Callable[[int], None]) -> dict[str, Any]:
        """The run to its max_steps; the kit's shard result: samples trained (num_ok), the latest checkpoint, and
        the cost summary."""
        start = time.perf_counter()
        self.reported = _last_logged_step(cfg)
        self._progress(cfg, self.reported, "starting")
        summary = self._run_ray(cfg) if cfg.executor == "ray" else self._run_local(cfg)
        self.summary = summary
        after = _latest_state(cfg)
        return {**summary, "shard": shard.name, "num_ok": after.get("samples_seen", 0) -
                self.before.get("samples_seen", 0), "num_error": 0,
                "skipped": self.before.get("step", 0) >= cfg.schedule.max_steps,
                "output_url": after.get("url"), "seconds": time.perf_counter() - start}

    def finish(self, cfg: TrainConfig, outcome: StageOutcome, runtime: Runtime) -> str:
        if not outcome.ok:
            return failure_message(outcome)
        summary = self.summary
        outcome.extra.update(summary)
        key = f"train-{cfg.run}".lower()
        grid = _latest_grid(cfg)
        if grid is not None:
            runtime.markdown(f"{key}-samples", grid, "latest sample grid")
        runtime.table(f"{key}-cost", [summary], "steps, GPU-hours and the paper's V100-days for this stage")
        return f"{cfg.run}: {summary['steps']} steps, {summary['gpu_hours']:.2f} GPU-hours"

    # -- the run, here or on Ray Train --------------------------------------------------------------------------------

    def _trainer(self, cfg: TrainConfig):
        from pixart.train.trainer import Trainer

        if self.conditions is None:  # in memory until the run can start
            self.conditions = prepare_conditions(cfg, self.found["text_width"], save=False)
        trainer = Trainer(cfg, conditions=self.conditions)
        trainer.resume(log=self.log)
        return trainer

    def _run_local(self, cfg: TrainConfig) -> dict[str, Any]:
        from pixart.train.run import train_worker

        trainer, self.trainer = self.trainer, None
        if trainer is None:  # a retry: a new trainer, from the latest checkpoint
            trainer = self._trainer(cfg)
        if self.conditions is not None and not self.conditions.stored(cfg):
            self.conditions.save(cfg)
        write_config(cfg)

        def logged(metrics: dict[str, Any]) -> None:
            self._progress(cfg, metrics["step"])
            self._step_logged(cfg, metrics)

        return train_worker(cfg, progress=logged, trainer=trainer)

    def _step_logged(self, cfg: TrainConfig, metrics: dict[str, Any]) -> None:
        self.reported = max(self.reported, int(metrics["step"]))
        if self.log_steps and self.runtime is not None:
            self.runtime.log(step_line(metrics, cfg.schedule.max_steps))
        if self.on_step is not None:
            self.on_step(metrics)

    def _run_ray(self, cfg: TrainConfig) -> dict[str, Any]:
        from flows._ray_train import run_ray

        stop = threading.Event()
        context = contextvars.copy_context()  # the run's (Prefect's) context, so progress artifacts belong to it
        watcher = threading.Thread(target=context.run, args=(self._watch, cfg, stop), daemon=True)
        watcher.start()
        try:
            run_ray(cfg, text_width=self.found["text_width"], before_start=lambda: write_config(cfg))
        finally:
            stop.set()
            watcher.join()
        self._read_back(cfg)  # the steps of the final flush
        with open_url(summary_url(cfg.output_root, cfg.run), "rb") as f:
            return {**json.loads(f.read()), "run": cfg.run}

    def _watch(self, cfg: TrainConfig, stop: threading.Event) -> None:
        """Progress and step lines from metrics.jsonl (flushed at each checkpoint) while the steps run on Ray
        workers."""
        while not stop.wait(WATCH_SECONDS):
            self._read_back(cfg)

    def _read_back(self, cfg: TrainConfig) -> None:
        """The steps metrics.jsonl holds past the last one reported, to the log and on_step, then the progress."""
        rows = _logged_rows(cfg)
        for metrics in rows:
            if int(metrics["step"]) > self.reported:
                self._step_logged(cfg, metrics)
        if rows:
            self._progress(cfg, int(rows[-1]["step"]))

    def _progress(self, cfg: TrainConfig, step: int, note: str = "") -> None:
        if self.runtime is not None:
            self.runtime.progress(step / cfg.schedule.max_steps, f"{cfg.run}: step {step} of "
                                  f"{cfg.schedule.max_steps}{f' ({note})' if note else ''}")


def _latest_state(cfg: TrainConfig) -> dict[str, Any]:
    """The trainer state of the run's latest checkpoint and its `url` ({} before the first)."""
    from pixart.train import checkpoint

    url = checkpoint.latest(cfg.output_root, cfg.run)
    return {**checkpoint.trainer_state(url), "url": url} if url else {}


def _logged_rows(cfg: TrainConfig) -> list[dict[str, Any]]:
    """metrics.jsonl's rows, in step order ([] before the first flush)."""
    url = metrics_url(cfg.output_root, cfg.run)
    if not exists(url):
        return []
    with open_url(url, "rb") as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


def _last_logged_step(cfg: TrainConfig) -> int:
    rows = _logged_rows(cfg)
    return int(rows[-1]["step"]) if rows else 0


THUMBNAIL = 512  # longest side of an image sent to Prefect as an artifact (a 1024 grid as-is is MBs of base64)


def thumbnail_markdown(png: bytes, alt: str, where: str) -> str:
    """An image as inline markdown, shrunk to a JPEG thumbnail; the full-size file is named below it."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMBNAIL, THUMBNAIL))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return f"![{alt}](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})\n\n`{where}`"


def _latest_grid(cfg: TrainConfig) -> str | None:
    """The run's latest sample grid (labelled with its prompts or classes) and its loss curve as markdown
    thumbnails, or None before the first grid."""
    fs, path = filesystem(samples_dir(cfg.output_root, cfg.run))
    grids = sorted(fs.glob(f"{path}/step-*.png"))
    if not grids:
        return None
    text = thumbnail_markdown(fs.cat_file(grids[-1]), "samples", grids[-1])
    loss = loss_plot_url(cfg.output_root, cfg.run)
    if exists(loss):
        text += "\n\n" + thumbnail_markdown(filesystem(loss)[0].cat_file(filesystem(loss)[1]), "loss", loss)
    return text


# ---------------------------------------------------------------------------------------------------------------------
# `pixart train`: the stage in this thread
# ---------------------------------------------------------------------------------------------------------------------


class _InlineRuntime(Runtime):
    """The run in the calling thread (Ctrl-C stops it at once), no retries (a re-run resumes), lines through `say`;
    no artifacts beyond the run's own files."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def log(self, message: str, level: int = logging.INFO) -> None:
        self.say(message)

    def run_shards(self, stage: Stage, cfg: Any, shards: list[Shard], on_done) -> None:
        for shard in shards:
            try:
                result = stage.run_shard(shard, cfg, lambda n: None)
            except Exception as e:  # noqa: BLE001 - recorded in the outcome; run_training raises it again
                on_done(shard, None, e)
            else:
                on_done(shard, result, None)


def run_training(cfg: TrainConfig, log: Callable[[str], None] = print,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train `cfg` to schedule.max_steps (resuming a run of the same name) on the stage kit, in this thread;
    returns the cost summary. `progress(metrics)` after each logged step. A run that fails raises its error."""
    stage = TrainStage(cfg, on_step=progress)
    outcome = run_stage(stage, cfg.run, [], False, _InlineRuntime(log))
    if stage.error is not None:
        raise stage.error
    if not outcome.ok:
        raise PipelineError(failure_message(outcome))
    return stage.summary

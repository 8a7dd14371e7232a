"""Prefect flow `pixart-pipeline`: the whole DAG of `flows/pipeline.py`, each step a subflow of its stage's flow
(`ingest`, `caption`, `extract`, `train`) plus the export as a task, so every step shows in the UI as its own run
with its own artifacts, and a Retry redoes only what is not done.

    prefect deployment run pixart-pipeline/pixart-pipeline-demo
    prefect deployment run pixart-pipeline/pixart-pipeline -p output_root=/data/pixart -p t5=/models/t5-v1_1-xxl

Parameters are typed fields (the storage root, the models, the steps to run, the caption prompt, where training
runs) with `overrides` for any other key of the pipeline config (`rates.<key>=<value>` for a rate of the
estimate). Before any step runs, the estimate of every step (samples, bytes, GPU-hours and their basis;
`flows/pipeline_cost.py`) is the artifact `pixart-pipeline-estimate`. The flow ends Completed only when every
selected step is done; the summary table (samples, errors, buckets, losses, time and bytes per step, the export's
path), then the estimate next to what each step's outputs measure, is the artifact `pixart-pipeline-summary`.

`train_executor=ray` trains every step on Ray Train (`executor=ray` appended to each train step's overrides, as
`caption_prompt` is to the caption settings; not lineage, so runs trained locally stay current). One Ray serves all
of the run's training steps: joined (`ray.address`, RAY_ADDRESS) or started locally when the first training step
runs, and shut down when the flow ends.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from flows._stage import INCOMPLETE
from flows.pipeline import Step, StepBusy, counted, demo_inputs, export_step, run_pipeline, summary_table
from flows.pipeline_config import PipelineConfig
from flows.pipeline_cost import comparison_markdown, estimate_markdown, estimate_plan, measure_plan
from storage.configio import load_config
from storage.errors import PipelineError

StepKind = Literal["ingest", "caption", "extract", "train", "export"]


@task(name="export", cache_policy=NO_CACHE)
def _export_task(cfg: PipelineConfig, train_step: str) -> dict:
    return export_step(cfg, train_step)


def with_train_executor(cfg: PipelineConfig, executor: Literal["local", "ray"]) -> PipelineConfig:
    """`cfg` with `executor=<executor>` last in every train step's overrides (not lineage: same run names; the Ray
    executor makes a relative output_root absolute for its workers itself)."""
    train = {name: t.model_copy(update={"overrides": [*t.overrides, f"executor={executor}"]})
             for name, t in cfg.train.items()}
    return cfg.model_copy(update={"train": train})


def _executor(args: list[str]) -> str | None:
    """The executor a train step's overrides name last (None: its preset's)."""
    named = [a.removeprefix("executor=") for a in args if a.startswith("executor=")]
    return named[-1] if named else None


def _shared_ray(preset: str, args: list[str], stack: ExitStack) -> None:
    """Join or start Ray (as the train stage would, from the step's `ray` keys) for the rest of the flow run, unless
    it is up: every later training step then runs on it instead of starting a Ray of its own. Workers' output stays
    in their logs (the run's metrics.jsonl has the steps)."""
    import ray

    if ray.is_initialized():
        return
    from flows._ray import ray_session
    from pixart.train.config import TrainConfig

    r = load_config(TrainConfig, preset, args, kind="train").ray
    try:
        stack.enter_context(ray_session(r.address, object_store_memory=r.object_store_memory,
                                        include_dashboard=r.include_dashboard, num_cpus=max(2, os.cpu_count() or 2)))
    except Exception as e:  # noqa: BLE001 - ray.init's errors are not PipelineErrors: the step fails in one line
        raise PipelineError(f"Ray did not start: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _subflow(step: Step, preset: str, args: list[str], cfg: PipelineConfig, ray: ExitStack | None = None) -> dict:
    if step.kind == "export":
        return _export_task(cfg, args[0])
    if step.kind == "train" and ray is not None and _executor(args) == "ray":
        _shared_ray(preset, args, ray)
    from flows.caption import caption
    from flows.extract import extract
    from flows.ingest import ingest
    from flows.train import train

    flows = {"ingest": ingest, "caption": caption, "extract": extract, "train": train}
    state = flows[step.kind].with_options(flow_run_name=step.name)(config=preset, overrides=args, return_state=True)
    if not state.is_completed():
        message = state.message or f"{step.name} ended {state.name}"
        raise StepBusy(message) if message.startswith(INCOMPLETE) else PipelineError(message)
    data = state.result(raise_on_failure=False)
    data = data if isinstance(data, dict) else {}
    return {**counted(data), "buckets": data.get("buckets"), "loss": data.get("final_loss"),
            "steps": data.get("steps")}


@flow(name="pixart-pipeline", validate_parameters=True)
def pixart_pipeline(config: str = "pipeline/demo", output_root: str | None = None, steps: list[StepKind] | None = None,
                    only: list[str] | None = None, llava: str | None = None, t5: str | None = None,
                    vae: str | None = None, caption_prompt: str | None = None,
                    train_executor: Literal["local", "ray"] | None = None, overrides: list[str] | None = None):
    """Raw shards -> manifests -> captions -> features -> the three training stages -> a diffusers export.

    Args:
        config: a pipeline preset (`demo`, `pixart-alpha`) or a YAML path.
        output_root: where every output goes (local path or s3://...); default: the preset's.
        steps: which kinds of step to run (ingest, caption, extract, train, export); default: all.
        only: run only these steps by name, e.g. `caption-sam` (see `pixart status`).
        llava: LLaVA id or local dir. t5: T5 encoder id or local dir. vae: VAE id or local dir.
        caption_prompt: the captioning prompt (default: the paper's).
        train_executor: where every training step runs: local (this process) or ray (Ray Train, one local Ray
            for the run unless `ray.address` or RAY_ADDRESS names a cluster); default: each train preset's.
        overrides: any other `key=value` of the pipeline config (`rates.<key>=<value>`: a rate of the estimate).
    """
    logger = get_run_logger()
    args = list(overrides or [])
    args += [f"output_root={output_root}"] if output_root else []
    args += [f"steps=[{','.join(steps)}]"] if steps else []
    args += [f"only=[{','.join(only)}]"] if only else []
    args += [f"models.{k}={v}" for k, v in (("llava", llava), ("t5", t5), ("vae", vae)) if v]
    try:
        cfg = load_config(PipelineConfig, config, args, kind="pipeline")
        if caption_prompt:
            cfg = cfg.model_copy(update={"caption": [*cfg.caption, f"prompt={caption_prompt}"]})
        if train_executor:
            cfg = with_train_executor(cfg, train_executor)
        cfg = demo_inputs(cfg)
        rates = cfg.rate_card()
    except PipelineError as e:
        logger.error(str(e))
        return Failed(message=str(e))
    estimates = estimate_plan(cfg, rates)
    create_markdown_artifact(estimate_markdown(estimates, rates), key="pixart-pipeline-estimate",
                             description="per step, before running: samples, bytes, GPU-hours and their basis")
    with ExitStack() as ray_stack:  # a Ray started for the training steps is shut down here
        outcome = run_pipeline(cfg, lambda step, preset, a: _subflow(step, preset, a, cfg, ray_stack),
                               log=lambda message: logger.log(logging.INFO, message))
    measured = measure_plan(cfg)
    summary = (summary_table(outcome, cfg, {step: m.bytes for step, m in measured.items()}) + "\n\n"
               + comparison_markdown(estimates, measured))
    create_markdown_artifact(summary, key="pixart-pipeline-summary",
                             description="steps, samples, losses, time; estimated vs measured")
    if not outcome.ok:
        return Failed(message="; ".join(f"{k}: {v}" for k, v in outcome.failed.items()))
    return Completed(message=f"{len(outcome.rows)} steps done or current", data=outcome.rows)

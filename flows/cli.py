"""The `pixart` command: runs the project's stages locally, through the same stage code as the Prefect flows,
without starting a Prefect server (a local run starts in about a second).

Every command but `demo` has one shape: a preset, then `key=value` overrides applied last.

    pixart COMMAND PRESET [key=value ...] [--force]

PRESET is a name under `configs/<command>/` or a YAML path. `pixart COMMAND --help` lists the presets and every key
with its description, both read from the command's config model when the help is shown. `--force` is `force=true`,
on the commands whose config has that key (ingest, caption, extract, export).

    pixart ingest sam source=/data/sa1b output_root=s3://bucket/pixart
    pixart caption sam output_root=/data/pixart model=/models/llava-1.5-7b-hf t5_tokenizer=/models/t5-v1_1-xxl
    pixart extract sam-256 caption_set=llava-1-5-7b-hf-1a2b3c4d output_root=/data/pixart
    pixart train stage2 init=/data/pixart/runs/stage1-imagenet-256 data.caption_set=llava-1-5-7b-hf-1a2b3c4d
    pixart sample grid checkpoint=/data/pixart/runs/stage2-sam-256 out=grid.png
    pixart export pipeline checkpoint=/data/pixart/runs/stage2-sam-256 out=/exports/stage2
    pixart audit sam caption_set=llava-1-5-7b-hf-1a2b3c4d output_root=/data/pixart
    pixart demo                                  # sample data in the real formats -> ... -> training -> export

Exit codes: 0 done; 1 some shards failed (the others are committed), a pipeline step failed or a selected one
could not run (its upstream not done and not selected), or an audit found a problem; 2 the run could
not start (bad preset or key, missing source, unusable output root or model, a busy training run), reported as one
`error:` line; 3 incomplete: shards that another live run still holds are not done here (named in the `error:`
line; re-run once that run ends).

A command's config class is imported only when that command runs or shows its help, so `pixart --help` and
`pixart ingest` never import torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_config import ConfigCommand, Force, Overrides, Preset, errors, fail, load_command_config

app = typer.Typer(help="PixArt-alpha data and training pipeline.", no_args_is_help=True, add_completion=False)

# ---------------------------------------------------------------------------------------------------------------------
# Data stages
# ---------------------------------------------------------------------------------------------------------------------


def _run(stage, preset: str, overrides: list[str], force: bool) -> dict:
    """Run a stage locally; exit 2 when it cannot start, 1 when shards failed, 3 when shards are busy elsewhere."""
    from flows._stage import LocalRuntime, run_stage

    with errors():
        outcome = run_stage(stage, preset, overrides, force, LocalRuntime())
    counts = outcome.counts()
    if outcome.failed:
        fail(counts["message"], code=1)
    if outcome.busy:  # not a success: those shards are not committed (yet)
        fail(counts["message"], code=3)
    return counts


@app.command(cls=ConfigCommand)
def ingest(preset: Preset, overrides: Overrides = None, force: Force = False) -> None:
    """Index source shards into parquet manifests under <output_root>/manifests/<dataset>/."""
    load_command_config("ingest", preset, overrides, force)  # a bad key fails here, before the stage's modules load
    from flows.ingest_stage import IngestStage

    out = _run(IngestStage(), preset, overrides or [], force)
    typer.echo(f"{out['dataset']}: {out['all_shards']} shards, {out['committed']} already committed, "
               f"{out['to_run']} to run, {out['num_ok']} samples ok, {out['num_error']} error rows")


@app.command(cls=ConfigCommand)
def caption(preset: Preset, overrides: Overrides = None, force: Force = False) -> None:
    """Caption ingested shards with LLaVA into <output_root>/captions/<dataset>/<caption_set>/."""
    load_command_config("caption", preset, overrides, force)
    from flows.caption_stage import CaptionStage

    out = _run(CaptionStage(), preset, overrides or [], force)
    typer.echo(f"{out['dataset']}/{out['caption_set']}: {out['captions']} captions, {out['errors']} error rows, "
               f"exactly-once {'verified' if out['exactly_once'] else 'NOT verified'}")


@app.command(cls=ConfigCommand)
def extract(
    preset: Preset,
    overrides: Overrides = None,
    force: Force = False,
    estimate: Annotated[bool, typer.Option("--estimate", help="Print bytes per sample and the total; extract "
                                                              "nothing.")] = False,
) -> None:
    """T5 text features and VAE latents into <output_root>/features/<dataset>/ (webdataset tars + parquet index)."""
    cfg = load_command_config("extract", preset, overrides, force)
    from flows.extract_stage import ExtractStage, estimate_run, feature_counts

    if estimate:
        with errors():
            est = estimate_run(cfg)
        typer.echo(f"{cfg.dataset}: {est['samples']} images, {est['captions']} captions; per sample "
                   f"{est['text_bytes_per_sample'] / 1e3:.1f} kB text + {est['latent_bytes_per_sample'] / 1e3:.1f} kB "
                   f"latents; total {est['total_bytes'] / 1e9:.3f} GB "
                   f"({est['ratio_to_official']:.1%} of the official fp32 padded layout, "
                   f"{est['official_total_bytes'] / 1e9:.3f} GB)")
        return
    out = _run(ExtractStage(), preset, overrides or [], force)
    typer.echo(f"{out['dataset']}: {out['all_shards']} shards, {out['committed']} already committed, "
               f"{out['to_run']} to run, {feature_counts(out['ok_by_kind'])}, {out['num_error']} error rows")


@app.command(cls=ConfigCommand)
def audit(preset: Preset, overrides: Overrides = None) -> None:
    """Check a dataset's manifests (keys in two shards) and, with caption_set, that every manifest key has exactly
    one caption or error row; exit 1 if not."""
    cfg = load_command_config("audit", preset, overrides)
    from captioning.audit import audit_caption_set
    from storage.ingest.dedupe import duplicate_report
    from storage.layout import caption_url
    from storage.manifest import committed_manifests

    with errors():
        cfg.check()
        dups = duplicate_report(cfg.output_root, cfg.dataset)
        report = audit_caption_set(cfg.output_root, cfg.dataset, cfg.caption_set) if cfg.caption_set else None
    ok = dups["unlisted_duplicates"] == 0
    typer.echo(f"{cfg.dataset} manifests: {dups['listed_duplicates']} keys listed as duplicates of an earlier "
               f"shard, {dups['unlisted_duplicates']} keys in two shards not listed")
    _print_reasons(f"{cfg.dataset} manifests", committed_manifests(cfg.output_root, cfg.dataset))
    if report is not None:
        _print_reasons(f"{cfg.dataset}/{cfg.caption_set} captions", [
            caption_url(cfg.output_root, cfg.dataset, cfg.caption_set, s["shard"]) for s in report["shards"]
            if s["committed"]])
    if report is not None:
        for s in report["shards"]:
            if not s["committed"] or s["missing"] or s["duplicated"] or s["unknown"]:
                typer.echo(f"  {s['shard']}: committed={s['committed']} missing={s['missing']} "
                           f"duplicated={s['duplicated']} unknown={s['unknown']}")
        typer.echo(f"{cfg.dataset}/{cfg.caption_set}: {report['keys']} manifest keys, {report['rows']} rows, "
                   f"{report['missing']} missing, {report['duplicated']} duplicated, {report['unknown']} unknown, "
                   f"{report['uncommitted']} shards uncommitted")
        ok = ok and report["ok"]
    typer.echo("OK" if ok else "FAILED")
    if not ok:
        raise typer.Exit(1)


def _print_reasons(what: str, urls: list[str]) -> None:
    """Error rows by reason, most frequent first, each with one example."""
    from storage.manifest import error_reasons

    reasons = error_reasons(urls)
    typer.echo(f"{what}: {sum(r['rows'] for r in reasons) if reasons else 0} error rows"
               + (" by reason:" if reasons else ""))
    for r in reasons:
        typer.echo(f"  {r['rows']:>6}  {r['reason']}   (e.g. {r['example'][:160]})")


# ---------------------------------------------------------------------------------------------------------------------
# Training, and using its checkpoints
# ---------------------------------------------------------------------------------------------------------------------


@app.command(cls=ConfigCommand)
def train(preset: Preset, overrides: Overrides = None) -> None:
    """Train one PixArt-alpha stage (locally, or on Ray Train with executor=ray); a re-run resumes the run.

    The presets run the paper's chain, each from the run before (init=<its run directory>): stage1, stage2, then
    stage 3's three steps stage3-256, stage3-512, stage3-1024."""
    cfg = load_command_config("train", preset, overrides)  # a bad key exits 2 here, before torch is imported
    from flows.train_stage import run_training
    from pixart.train.prepare import with_recorded_encoders

    with errors():
        cfg = with_recorded_encoders(cfg)  # t5_model / vae_model, when unset, as the features record them
        summary = run_training(cfg, log=typer.echo, progress=lambda m: typer.echo(
            f"step {m['step']}: loss {m['loss']:.4f} grad_norm {m['grad_norm']:.3g} lr {m['lr']:.3g} "
            f"{m['samples_per_s']:.1f} samples/s"))
    typer.echo(f"{summary['run']}: {summary['steps']} steps, final loss {summary['final_loss']}, "
               f"{summary['gpu_hours']:.3f} GPU-hours (paper stage {summary['stage']}"
               f"{' ' + summary['stage_step'] if summary.get('stage_step') else ''}: "
               f"{summary['paper_v100_days']} V100-days)")


def _checkpoint_of(path: str) -> str:
    """A checkpoint directory as given, or a run directory's latest checkpoint."""
    from pixart.train import checkpoint
    from storage.layout import CHECKPOINTS

    p = Path(path)
    if (p / CHECKPOINTS).is_dir():
        found = checkpoint.run_checkpoints(str(p))
        if not found:
            fail(f"run {path} has no committed checkpoint yet")
        return found[-1][1]
    return path


@app.command(cls=ConfigCommand)
def sample(preset: Preset, overrides: Overrides = None) -> None:
    """Sample a grid from a training checkpoint with the T5 and VAE its run names."""
    cfg = load_command_config("sample", preset, overrides)
    from pixart.train.sampling import sample_checkpoint

    with errors():
        image = sample_checkpoint(_checkpoint_of(cfg.checkpoint), cfg.sample_prompts, cfg.sample_classes,
                                  steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale, seed=cfg.seed, device=cfg.device,
                                  use_ema=cfg.weights == "ema")
        image.save(cfg.out)
    typer.echo(f"wrote {cfg.out} ({image.width}x{image.height})")


@app.command(cls=ConfigCommand)
def export(preset: Preset, overrides: Overrides = None, force: Force = False) -> None:
    """Export a checkpoint as a diffusers pipeline directory (transformer + scheduler, naming the T5 and VAE)."""
    cfg = load_command_config("export", preset, overrides, force)
    from pixart.export import export as export_checkpoint

    with errors():
        path = export_checkpoint(_checkpoint_of(cfg.checkpoint), cfg.out, use_ema=cfg.weights == "ema",
                                 bundle=cfg.bundle, force=cfg.force)
    typer.echo(f"exported to {path}")


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline: every step as one DAG (flows/pipeline.py); the demo is its `demo` preset
# ---------------------------------------------------------------------------------------------------------------------


def _pipeline_config(preset: str, overrides: list[str] | None):
    from flows.pipeline import demo_inputs

    cfg = load_command_config("pipeline", preset, overrides)
    with errors():
        return demo_inputs(cfg)


@app.command(cls=ConfigCommand)
def pipeline(preset: Preset, overrides: Overrides = None) -> None:
    """Run the whole pipeline (ingest -> caption -> extract -> stage 1 -> stage 2 -> stage 3 -> export) as one DAG:
    every step that is not done for its current inputs and config runs, the others are skipped and say so. Ends
    with the summary table, then, unless every selected step is done, one `error:` line naming the steps (and busy
    shards): exit 1 when a step failed or a selected step waits for one not selected (see `only`), 3 when only
    shards that another live run holds are not done (re-run once it ends)."""
    from flows.pipeline import local_runner, run_pipeline, summary_table
    from flows.pipeline_cost import comparison_markdown, estimate_plan, estimate_text, measure_plan

    cfg = _pipeline_config(preset, overrides)
    with errors():
        rates = cfg.rate_card()
        estimates = estimate_plan(cfg, rates)
        typer.echo(estimate_text(estimates, rates), err=True)
        outcome = run_pipeline(cfg, local_runner(cfg), log=lambda m: typer.echo(m, err=True))
    measured = measure_plan(cfg)
    typer.echo(summary_table(outcome, cfg, {step: m.bytes for step, m in measured.items()}))
    typer.echo("\n" + comparison_markdown(estimates, measured))
    if not outcome.ok:
        fail(outcome.message(), code=outcome.exit_code)


@app.command(cls=ConfigCommand)
def status(
    preset: Preset,
    overrides: Overrides = None,
    estimate: Annotated[bool, typer.Option("--estimate", help="Then, per step: samples, bytes written and GPU-hours, "
                                                              "each with its basis, from a measured sample of each "
                                                              "dataset, at the rates of `rate_table` (configs/"
                                                              "rates/) and `rates.<key>=<value>`.")]
    = False,
) -> None:
    """Print the pipeline's DAG with each step's state, running nothing: done, pending (missing, or stale and
    why), failed (a pipeline run's last try failed, with its message, until the step is done), or waiting for an
    upstream step. With --estimate, then the cost and storage of every step (reading the
    first samples of each source that has no manifests yet; flows/pipeline_cost.py)."""
    from flows.pipeline import plan, state
    from flows.pipeline_cost import estimate_plan, estimate_text

    cfg = _pipeline_config(preset, overrides)
    done: set[str] = set()
    with errors():
        rates = cfg.rate_card() if estimate else None  # a bad rate key fails before anything runs
        for step in plan(cfg):
            s = state(cfg, step, done)
            if s.state == "done":
                done.add(step.name)
            after = f"  <- {', '.join(step.after)}" if step.after else ""
            label = f"{s.state}:" if s.state == "failed" else s.state  # failed: <its message>
            typer.echo(f"{step.name:<24} {label:<8} {s.detail}{after}")
        if rates is not None:
            typer.echo("\n" + estimate_text(estimate_plan(cfg, rates), rates))


@app.command(cls=ConfigCommand)
def setup(preset: Preset, overrides: Overrides = None) -> None:
    """Create, once per cluster, what the Prefect side expects (PREFECT_API_URL must point at the server): the
    pixart-gpu global concurrency limit and the automation that marks runs without heartbeats Crashed."""
    from flows.setup import setup_prefect

    cfg = load_command_config("setup", preset, overrides)
    with errors():
        for line in setup_prefect(cfg):
            typer.echo(line)


@app.command()
def demo() -> None:
    """The same as `pixart pipeline demo`: sample SA-1B, JourneyDB and ImageNet shards from real photos and tiny
    random models (built offline under demo-output/ once) through every step, on this machine: ingest -> captions
    -> T5 features and VAE latents -> training stage 1 -> stage 2 -> stage 3 (hq256 -> hq512 -> ms1024) -> export."""
    pipeline("demo", None)


def main() -> None:
    app(prog_name="pixart")


if __name__ == "__main__":
    sys.exit(main())

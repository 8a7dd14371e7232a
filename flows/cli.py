"""The `pixart` command: runs the project's stages locally, through the same stage code as the Prefect flows,
without starting a Prefect server (a local run starts in about a second).

    pixart ingest sam source=/data/sa1b output_root=s3://bucket/pixart
    pixart caption sam output_root=/data/pixart model=/models/llava-1.5-7b-hf t5_tokenizer=/models/t5-v1_1-xxl
    pixart audit dataset=sam caption_set=llava-1-5-7b-hf-1a2b3c4d output_root=/data/pixart
    pixart demo                                  # sample data in the real formats -> manifests -> captions

Exit codes: 0 done; 1 some shards failed (the others are committed); 2 the run could not start (bad config,
missing source, unusable output root or model), reported as one `error:` line; 3 incomplete: shards that another
live run still holds are not done here (named in the `error:` line; re-run once that run ends).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from captioning.config import CaptionConfig
from pixart.features.config import ExtractConfig
from pixart.train.config import TrainConfig
from storage.errors import PipelineError
from storage.ingest.config import IngestConfig

app = typer.Typer(help="PixArt-alpha data and training pipeline.", no_args_is_help=True, add_completion=False)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _run(stage, config: str, overrides: list[str], force: bool) -> dict:
    """Run a stage locally; exit 2 when it cannot start, 1 when shards failed, 3 when shards are busy elsewhere."""
    from flows._stage import LocalRuntime, run_stage

    try:
        outcome = run_stage(stage, config, overrides, force, LocalRuntime())
    except PipelineError as e:
        _fail(str(e))
    counts = outcome.counts()
    if outcome.failed:
        _fail(counts["message"], code=1)
    if outcome.busy:  # not a success: those shards are not committed (yet)
        _fail(counts["message"], code=3)
    return counts


def _config_keys(model, prefix: str = "") -> list[str]:
    """'key: description' lines for every field of a config model (nested models flattened with dots)."""
    lines = []
    for name, field in model.model_fields.items():
        sub = field.annotation if isinstance(field.annotation, type) else None
        if sub is not None and hasattr(sub, "model_fields"):
            lines += _config_keys(sub, f"{prefix}{name}.")
        else:
            lines.append(f"{prefix}{name}: {field.description or ''}")
    return lines


@app.command(epilog="Config keys (override with key=value):\n\n" + "\n\n".join(_config_keys(IngestConfig)))
def ingest(
    config: Annotated[str, typer.Argument(help="Preset under configs/ingest/ (sam, journeydb, imagenet) or a YAML "
                                               "path.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. source=/data/sa1b")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-ingest shards that are already committed.")] = False,
) -> None:
    """Index source shards into parquet manifests under <output_root>/manifests/<dataset>/."""
    from flows.ingest_stage import IngestStage

    out = _run(IngestStage(), config, overrides or [], force)
    typer.echo(f"{out['dataset']}: {out['all_shards']} shards, {out['committed']} already committed, "
               f"{out['to_run']} to run, {out['num_ok']} samples ok, {out['num_error']} error rows")


@app.command(epilog="Config keys (override with key=value):\n\n" + "\n\n".join(_config_keys(CaptionConfig)))
def caption(
    config: Annotated[str, typer.Argument(help="Preset under configs/caption/ (sam, journeydb) or a YAML path.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. model=/m/llava")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-caption shards already in this caption set.")] = False,
) -> None:
    """Caption ingested shards with LLaVA into <output_root>/captions/<dataset>/<caption_set>/."""
    from flows.caption_stage import CaptionStage

    out = _run(CaptionStage(), config, overrides or [], force)
    typer.echo(f"{out['dataset']}/{out['caption_set']}: {out['captions']} captions, {out['errors']} error rows, "
               f"exactly-once {'verified' if out['exactly_once'] else 'NOT verified'}")


@app.command(epilog="Config keys (override with key=value):\n\n" + "\n\n".join(_config_keys(ExtractConfig)))
def extract(
    config: Annotated[str, typer.Argument(help="Preset under configs/extract/ (sam-256, sam-1024, journeydb-256, "
                                               "journeydb-1024, imagenet-256) or a YAML path.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. caption_set=<name>")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo shards that are already committed.")] = False,
    estimate: Annotated[bool, typer.Option("--estimate", help="Print bytes per sample and the total; extract "
                                                              "nothing.")] = False,
) -> None:
    """T5 text features and VAE latents into <output_root>/features/<dataset>/ (webdataset tars + parquet index)."""
    from flows.extract_stage import ExtractStage, estimate_run, feature_counts
    from storage.configio import load_config

    if estimate:
        try:
            cfg = load_config(ExtractConfig, config, overrides or [], kind="extract")
            est = estimate_run(cfg)
        except PipelineError as e:
            _fail(str(e))
        typer.echo(f"{cfg.dataset}: {est['samples']} images, {est['captions']} captions; per sample "
                   f"{est['text_bytes_per_sample'] / 1e3:.1f} kB text + {est['latent_bytes_per_sample'] / 1e3:.1f} kB "
                   f"latents; total {est['total_bytes'] / 1e9:.3f} GB "
                   f"({est['ratio_to_official']:.1%} of the official fp32 padded layout, "
                   f"{est['official_total_bytes'] / 1e9:.3f} GB)")
        return
    out = _run(ExtractStage(), config, overrides or [], force)
    typer.echo(f"{out['dataset']}: {out['all_shards']} shards, {out['committed']} already committed, "
               f"{out['to_run']} to run, {feature_counts(out['ok_by_kind'])}, {out['num_error']} error rows")


@app.command(epilog="Config keys (override with key=value):\n\n" + "\n\n".join(_config_keys(TrainConfig)))
def train(
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. data.caption_set=<name>")]
    = None,
    stage: Annotated[int | None, typer.Option(help="1, 2 or 3: the stage's preset (stage1, stage2; stage 3 with "
                                                   "--step) when --config is not given.")] = None,
    step: Annotated[str | None, typer.Option(help="Stage 3's step, each its own run from the previous one's "
                                                  "weights, in this order: hq256 (stage3-256: 90K steps at 256, "
                                                  "from stage 2), hq512 (stage3-512: 100K at 512), ms1024 "
                                                  "(stage3-1024: 16K at 1024 multi-scale).")] = None,
    config: Annotated[str | None, typer.Option(help="Preset under configs/train/ (stage1, stage2, stage3-256, "
                                                    "stage3-512, stage3-1024, tiny-stage1..3) or a YAML path.")]
    = None,
    init: Annotated[str | None, typer.Option(help="Previous stage's run directory (its latest committed "
                                                  "checkpoint), checkpoint or export, or a DiT (stage 2); "
                                                  "init_weights=model|ema picks the checkpoint's weights.")]
    = None,
) -> None:
    """Train one PixArt-alpha stage (locally, or on Ray Train with executor=ray); a re-run resumes the run. Stage 3
    is three steps, named with --step: `--stage 3` alone is refused, listing them."""
    from flows.train_stage import load_train_config, run_training, stage_preset

    if config is None and stage not in (1, 2, 3):
        _fail("give --stage 1|2|3 (stage 3 with --step hq256|hq512|ms1024) or --config <preset or YAML>")
    try:
        config = config or stage_preset(stage, step)
    except PipelineError as e:
        _fail(str(e))
    extra = [*(overrides or []), *([f"stage={stage}"] if stage is not None else []),
             *([f"stage_step={step}"] if step is not None else [])]
    try:
        cfg = load_train_config(config, extra, init)
        summary = run_training(cfg, log=typer.echo, progress=lambda m: typer.echo(
            f"step {m['step']}: loss {m['loss']:.4f} grad_norm {m['grad_norm']:.3g} lr {m['lr']:.3g} "
            f"{m['samples_per_s']:.1f} samples/s"))
    except PipelineError as e:
        _fail(str(e))
    except OSError as e:  # a full disk or a lost mount outside a checkpoint save (metrics, samples)
        _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    typer.echo(f"{summary['run']}: {summary['steps']} steps, final loss {summary['final_loss']}, "
               f"{summary['gpu_hours']:.3f} GPU-hours (paper stage {summary['stage']}"
               f"{' ' + summary['stage_step'] if summary.get('stage_step') else ''}: "
               f"{summary['paper_v100_days']} V100-days)")


def _checkpoint_of(path: str) -> str:
    """A checkpoint directory as given, or a run directory's latest checkpoint."""
    from pixart.train import checkpoint

    p = Path(path)
    if (p / "checkpoints").is_dir():
        found = checkpoint.run_checkpoints(str(p))
        if not found:
            _fail(f"run {path} has no committed checkpoint yet")
        return found[-1][1]
    return path


@app.command()
def sample(
    checkpoint_dir: Annotated[str, typer.Argument(help="A checkpoint directory, or a run directory (its latest).")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt; repeat for a grid.")] = None,
    class_id: Annotated[list[int] | None, typer.Option("--class", help="Stage 1: an ImageNet class id.")] = None,
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("samples.png"),
    steps: Annotated[int, typer.Option(help="DPM-Solver++ steps.")] = 20,
    cfg_scale: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale.")] = 4.5,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Sample a grid from a training checkpoint (EMA weights when present) with the T5 and VAE it names."""
    from pixart.train.sampling import sample_checkpoint

    try:
        image = sample_checkpoint(_checkpoint_of(checkpoint_dir), prompt, class_id, steps=steps,
                                  cfg_scale=cfg_scale, seed=seed, device=device)
    except (PipelineError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    image.save(out)
    typer.echo(f"wrote {out} ({image.width}x{image.height})")


@app.command()
def export(
    checkpoint_dir: Annotated[str, typer.Argument(help="A checkpoint directory, or a run directory (its latest).")],
    out: Annotated[str, typer.Argument(help="Directory to write: PixArtAlphaPipeline.from_pretrained(out) loads it.")],
    bundle: Annotated[bool, typer.Option("--bundle", help="Copy the T5 and VAE in, so the export stands alone.")]
    = False,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Export the trained weights, not the EMA.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a different export at `out`.")] = False,
) -> None:
    """Export a checkpoint as a diffusers pipeline directory (transformer + scheduler, naming the T5 and VAE)."""
    from pixart.export import export as export_checkpoint

    try:
        path = export_checkpoint(_checkpoint_of(checkpoint_dir), out, use_ema=not no_ema, bundle=bundle, force=force)
    except (PipelineError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"exported to {path}")


@app.command(epilog="Keys: dataset (sam, journeydb, imagenet), caption_set (optional), output_root.")
def audit(
    args: Annotated[list[str], typer.Argument(help="key=value: dataset=sam caption_set=<name> output_root=<root>")],
) -> None:
    """Check a dataset's manifests (keys in two shards) and, with caption_set, that every manifest key has exactly
    one caption or error row; exit 1 if not."""
    from captioning.audit import AuditConfig, audit_caption_set
    from storage.configio import load_config
    from storage.ingest.dedupe import duplicate_report

    try:
        cfg = load_config(AuditConfig, None, args)
        cfg.check()
        dups = duplicate_report(cfg.output_root, cfg.dataset)
        report = audit_caption_set(cfg.output_root, cfg.dataset, cfg.caption_set) if cfg.caption_set else None
    except PipelineError as e:
        _fail(str(e))
    ok = dups["unmarked_duplicates"] == 0
    typer.echo(f"{cfg.dataset} manifests: {dups['marked_duplicates']} rows marked as duplicates of an earlier "
               f"shard, {dups['unmarked_duplicates']} keys still ok in two shards")
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


@app.command()
def demo(
    root: Annotated[Path, typer.Option(help="Where sample data and outputs are written.")] = Path("demo-output"),
    short_side: Annotated[int, typer.Option(help="Short side of the sample SA-1B images (real: 1500).")] = 768,
    caption_model: Annotated[str | None, typer.Option(help="LLaVA id or dir; default: a tiny random one.")] = None,
    t5_tokenizer: Annotated[str | None, typer.Option(help="T5 tokenizer id or dir; default: a tiny one.")] = None,
    t5_encoder: Annotated[str | None, typer.Option(help="T5 encoder id or dir; default: a tiny one.")] = None,
    vae: Annotated[str | None, typer.Option(help="AutoencoderKL id or dir; default: a tiny one.")] = None,
) -> None:
    """Sample SA-1B, JourneyDB and ImageNet shards from real photos -> manifests -> LLaVA captions -> T5 features and
    VAE latents (256 and 512 px, and 1024 px in aspect-ratio buckets) -> the three training stages on tiny models
    (stage 3 in its three steps, hq256 -> hq512 -> ms1024) -> export.

    Without --caption-model the captions come from a tiny random LLaVA built on the spot (no downloads), so
    they are noise: the demo shows the pipeline and its outputs, not caption quality. The same holds for the tiny
    T5 encoder and VAE."""
    from captioning.tiny import make_tiny_llava, make_tiny_t5_tokenizer
    from flows.caption_stage import CaptionStage
    from flows.extract_stage import ExtractStage, feature_counts
    from flows.ingest_stage import IngestStage
    from storage.ingest.samples import build_samples
    from storage.manifest import read_dataset

    root = root.resolve()
    raw = build_samples(root / "raw", short_side=short_side)
    out = str(root / "pixart")
    runs = {
        "sam": [f"source={raw['sam_links']}"],
        "journeydb": [f"source={raw['journeydb']}", f"annotations={raw['journeydb_annotations']}"],
        "imagenet": [f"source={raw['imagenet']}", f"synset_mapping={raw['synset_mapping']}"],
    }
    for preset, overrides in runs.items():
        _run(IngestStage(), preset, [*overrides, f"output_root={out}"], force=True)
    model = caption_model or make_tiny_llava(root / "models" / "tiny-llava")
    t5 = t5_tokenizer or make_tiny_t5_tokenizer(root / "models" / "tiny-t5")
    captions = {}
    for dataset in ("sam", "journeydb"):
        captions[dataset] = _run(CaptionStage(), dataset, [f"output_root={out}", f"model={model}",
                                                           f"t5_tokenizer={t5}", "generation.max_new_tokens=40",
                                                           "batch_size=4"], force=True)
    from pixart.tiny import make_tiny_t5_encoder, make_tiny_vae

    t5_model = t5_encoder or make_tiny_t5_encoder(root / "models" / "tiny-t5-encoder", t5)
    vae_model = vae or make_tiny_vae(root / "models" / "tiny-vae")
    features = {}
    models = [f"output_root={out}", f"t5_model={t5_model}", f"vae_model={vae_model}"]
    sam_set = f"caption_set={captions['sam']['caption_set']}"
    for name, preset, extra in (("sam-256", "sam-256", [sam_set]),
                                ("sam-512", "sam-256", [sam_set, "what=latents", "base_size=512"]),  # stage 3 hq512
                                ("sam-1024", "sam-1024", [sam_set, "what=latents"]),
                                ("imagenet-256", "imagenet-256", [])):
        features[name] = _run(ExtractStage(), preset, [*models, *extra], force=True)
    trained = _demo_training(out, captions["sam"]["caption_set"], t5_model, vae_model)
    typer.echo(f"\nmanifests under {out}/manifests:")
    for dataset in runs:
        table = read_dataset(out, dataset).to_pylist()
        ok = [r for r in table if r["status"] == "ok"]
        typer.echo(f"  {dataset:<10} {len(ok)} ok / {len(table)} rows, e.g. {ok[0]['key']} "
                   f"{ok[0]['width']}x{ok[0]['height']} {ok[0]['prompt'] or ok[0]['wnid'] or ''}")
    typer.echo(f"captions under {out}/captions (quality report: quality.md in each caption set):")
    for dataset, res in captions.items():
        typer.echo(f"  {dataset:<10} set {res['caption_set']}: {res['captions']} captions, {res['errors']} error "
                   f"rows, exactly-once {'verified' if res['exactly_once'] else 'NOT verified'}")
    typer.echo(f"features under {out}/features (bucket histogram: buckets.png beside the latents):")
    for preset, res in features.items():
        typer.echo(f"  {preset:<13} {feature_counts(res['ok_by_kind'])}, {res['num_error']} error rows")
    typer.echo(f"training runs under {out}/runs (metrics.jsonl, loss.png, samples/, checkpoints/):")
    for name, res in trained.items():
        typer.echo(f"  {name:<14} {res['steps']} steps, final loss {res['final_loss']:.4f}")
    typer.echo(f"export (PixArtAlphaPipeline.from_pretrained): {out}/export")


def _demo_training(out: str, caption_set: str, t5_model: str, vae_model: str) -> dict:
    """The training chain of the full presets on tiny models, each run started from the previous run's directory
    (its latest checkpoint, trained weights): a class-conditional DiT on ImageNet latents (stage 1); PixArt at 256
    re-parameterised from it (stage 2); stage 3's three steps, hq256 at 256, hq512 at 512 and ms1024 (PixArt-MS at
    1024 in aspect-ratio buckets), on the SAM features (the demo extracts no JourneyDB features); then the
    export."""
    from flows.train_stage import load_train_config, run_training
    from pixart.export import export as export_checkpoint
    from pixart.train import checkpoint
    from storage.layout import run_dir

    common = [f"output_root={out}", f"t5_model={t5_model}", f"vae_model={vae_model}"]
    text = [f"data.caption_set={caption_set}"]

    def single(size: int) -> list[str]:
        return [f"data.base_size={size}", "data.multi_scale=false", "model.multi_scale=false"]

    stages = {"stage 1": ("tiny-stage1", "demo-stage1", []),
              "stage 2": ("tiny-stage2", "demo-stage2", text),
              "stage 3 hq256": ("tiny-stage3", "demo-stage3-hq256", [*text, "stage_step=hq256", *single(256)]),
              "stage 3 hq512": ("tiny-stage3", "demo-stage3-hq512", [*text, "stage_step=hq512", *single(512)]),
              "stage 3 ms1024": ("tiny-stage3", "demo-stage3-ms1024", [*text, "stage_step=ms1024",
                                                                       "data.base_size=1024"])}
    results, previous = {}, None
    for name, (preset, run, extra) in stages.items():
        cfg = load_train_config(preset, [*common, *extra, f"run={run}"], run_dir(out, previous) if previous else None)
        results[name] = run_training(cfg, log=lambda m: None)
        previous = run
    export_checkpoint(checkpoint.latest(out, previous), f"{out}/export", force=True)
    return results


def main() -> None:
    app(prog_name="pixart")


if __name__ == "__main__":
    sys.exit(main())

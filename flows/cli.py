"""The `pixart` command: runs the project's flows locally (the same flows that the Prefect deployments run).

    pixart ingest sam source=/data/sa1b output_root=s3://bucket/pixart
    pixart ingest journeydb --force
    pixart demo                                  # sample data in the real formats -> manifests
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from captioning.config import CaptionConfig
from storage.config import IngestConfig
from storage.errors import PipelineError

app = typer.Typer(help="PixArt-alpha data and training pipeline.", no_args_is_help=True, add_completion=False)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _run_ingest(config: str, overrides: list[str], force: bool) -> dict:
    from flows.ingest import ingest as ingest_flow
    from storage.configio import load_config

    load_config(IngestConfig, config, overrides, kind="ingest")  # fail fast, before a Prefect server starts
    state = ingest_flow(config=config, overrides=overrides, force=force, return_state=True)
    if not state.is_completed():
        _fail(state.message or state.name, code=1)
    return state.result()


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
    config: Annotated[str, typer.Argument(help="Preset (sam, journeydb, imagenet) or a YAML path.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. source=/data/sa1b")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-ingest shards that are already committed.")] = False,
) -> None:
    """Index source shards into parquet manifests under <output_root>/manifests/<dataset>/."""
    try:
        outcome = _run_ingest(config, overrides or [], force)
    except PipelineError as e:
        _fail(str(e))
    typer.echo(f"{outcome['dataset']}: {outcome['done']} shards ({outcome['skipped']} already committed), "
               f"{outcome['num_ok']} samples ok, {outcome['num_error']} error rows")


@app.command(epilog="Config keys (override with key=value):\n\n" + "\n\n".join(_config_keys(CaptionConfig)))
def caption(
    config: Annotated[str, typer.Argument(help="Preset (sam, journeydb) or a YAML path.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. model=/m/llava")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-caption shards already in this caption set.")] = False,
) -> None:
    """Caption ingested shards with LLaVA into <output_root>/captions/<dataset>/<caption_set>/."""
    from flows.caption import caption as caption_flow
    from storage.configio import load_config

    try:
        load_config(CaptionConfig, config, overrides or [], kind="caption")  # fail fast, before Prefect starts
        state = caption_flow(config=config, overrides=overrides or [], force=force, return_state=True)
    except PipelineError as e:
        _fail(str(e))
    if not state.is_completed():
        _fail(state.message or state.name, code=1)
    out = state.result()
    typer.echo(f"{out['dataset']}/{out['caption_set']}: {out['captions']} captions, {out['errors']} error rows, "
               f"exactly-once {'verified' if out['exactly_once'] else 'NOT verified'}")


@app.command()
def audit(
    dataset: Annotated[str, typer.Argument(help="sam or journeydb")],
    caption_set: Annotated[str, typer.Argument(help="Caption set name (a folder under captions/<dataset>/).")],
    output_root: Annotated[str, typer.Option(help="Root of manifests and captions.")] = "data/pixart",
) -> None:
    """Check that every manifest key has exactly one caption or error row; exit 1 if not."""
    from captioning.audit import audit_caption_set

    report = audit_caption_set(output_root, dataset, caption_set)
    for s in report["shards"]:
        if not s["committed"] or s["missing"] or s["duplicated"] or s["unknown"]:
            typer.echo(f"  {s['shard']}: committed={s['committed']} missing={s['missing']} "
                       f"duplicated={s['duplicated']} unknown={s['unknown']}")
    typer.echo(f"{dataset}/{caption_set}: {report['keys']} manifest keys, {report['rows']} rows, "
               f"{report['missing']} missing, {report['duplicated']} duplicated, {report['unknown']} unknown, "
               f"{report['uncommitted']} shards uncommitted -> {'OK' if report['ok'] else 'FAILED'}")
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def demo(
    root: Annotated[Path, typer.Option(help="Where sample data and outputs are written.")] = Path("demo-output"),
    short_side: Annotated[int, typer.Option(help="Short side of the sample SA-1B images (real: 1500).")] = 768,
    caption_model: Annotated[str | None, typer.Option(help="LLaVA id or dir; default: a tiny random one.")] = None,
    t5_tokenizer: Annotated[str | None, typer.Option(help="T5 tokenizer id or dir; default: a tiny one.")] = None,
) -> None:
    """Sample SA-1B, JourneyDB and ImageNet shards from real photos -> manifests -> LLaVA captions.

    Without --caption-model the captions come from a tiny random LLaVA built on the spot (no downloads), so
    they are noise: the demo shows the pipeline and its outputs, not caption quality."""
    from storage.manifest import read_dataset
    from storage.samples import build_samples

    raw = build_samples(root / "raw", short_side=short_side)
    out = str(root / "pixart")
    runs = {
        "sam": [f"source={raw['sam_links']}"],
        "journeydb": [f"source={raw['journeydb']}", f"annotations={raw['journeydb_annotations']}"],
        "imagenet": [f"source={raw['imagenet']}", f"synset_mapping={raw['synset_mapping']}"],
    }
    try:
        for preset, overrides in runs.items():
            _run_ingest(preset, [*overrides, f"output_root={out}"], force=True)
    except PipelineError as e:
        _fail(str(e))
    from captioning.tiny import make_tiny_llava, make_tiny_t5_tokenizer

    model = caption_model or make_tiny_llava(root / "models" / "tiny-llava")
    t5 = t5_tokenizer or make_tiny_t5_tokenizer(root / "models" / "tiny-t5")
    from flows.caption import caption as caption_flow

    captions = {}
    for dataset in ("sam", "journeydb"):
        state = caption_flow(config=dataset, overrides=[f"output_root={out}", f"model={model}", f"t5_tokenizer={t5}",
                                                        "generation.max_new_tokens=40", "batch_size=4"],
                             force=True, return_state=True)
        if not state.is_completed():
            _fail(state.message or state.name, code=1)
        captions[dataset] = state.result()
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


def main() -> None:
    app(prog_name="pixart")


if __name__ == "__main__":
    sys.exit(main())

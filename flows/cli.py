"""The `pixart` command: runs the project's flows locally (the same flows that the Prefect deployments run).

    pixart ingest sam source=/data/sa1b output_root=s3://bucket/pixart
    pixart ingest journeydb --force
    pixart demo                                  # sample data in the real formats -> manifests
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from storage.errors import PipelineError

app = typer.Typer(help="PixArt-alpha data and training pipeline.", no_args_is_help=True, add_completion=False)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _run_ingest(config: str, overrides: list[str], force: bool) -> dict:
    from flows.ingest import ingest as ingest_flow
    from storage.config import IngestConfig
    from storage.configio import load_config

    load_config(IngestConfig, config, overrides, kind="ingest")  # fail fast, before a Prefect server starts
    state = ingest_flow(config=config, overrides=overrides, force=force, return_state=True)
    if not state.is_completed():
        _fail(state.message or state.name, code=1)
    return state.result()


@app.command()
def ingest(
    config: str = typer.Argument(..., help="Preset (sam, journeydb, imagenet) or a YAML path."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. source=/data/sa1b"),
    force: bool = typer.Option(False, "--force", help="Re-ingest shards that are already committed."),
) -> None:
    """Index source shards into parquet manifests under <output_root>/manifests/<dataset>/."""
    try:
        outcome = _run_ingest(config, overrides or [], force)
    except PipelineError as e:
        _fail(str(e))
    typer.echo(f"{outcome['dataset']}: {outcome['done']} shards ({outcome['skipped']} already committed), "
               f"{outcome['num_ok']} samples ok, {outcome['num_error']} error rows")


@app.command()
def demo(
    root: Path = typer.Option(Path("demo-output"), help="Where sample data and outputs are written."),
    short_side: int = typer.Option(768, help="Short side of the sample SA-1B images (the real ones have 1500)."),
) -> None:
    """Build sample SA-1B, JourneyDB and ImageNet shards from real photos, then ingest all three."""
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
    typer.echo(f"\nmanifests under {out}/manifests:")
    for dataset in runs:
        table = read_dataset(out, dataset).to_pylist()
        ok = [r for r in table if r["status"] == "ok"]
        typer.echo(f"  {dataset:<10} {len(ok)} ok / {len(table)} rows, e.g. {ok[0]['key']} "
                   f"{ok[0]['width']}x{ok[0]['height']} {ok[0]['prompt'] or ok[0]['wnid'] or ''}")


def main() -> None:
    app(prog_name="pixart")


if __name__ == "__main__":
    sys.exit(main())

"""Prefect flow `ingest`: one task per source shard, each writing a committed parquet manifest.

    prefect deployment run ingest/ingest-sam -p source=/data/sa1b -p output_root=s3://bucket/pixart -p max_shards=2

The work is `flows/ingest_stage.py` on the stage kit (`flows/_stage.py`), the same code `pixart ingest` runs
locally without a Prefect server. At most `workers` shard tasks run at a time; committed shards are skipped unless
`force`; transient failures are retried twice, permanent ones fail the shard at once; a failed shard, or one that
another live run still holds, fails the run at the end (naming it), after every other shard.
Artifacts: `ingest-<dataset>-shards` (table), `-summary`, `-progress`.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows._prefect import Redo, run_as_flow, with_typed
from flows.ingest_stage import IngestStage

MAX_TASK_THREADS = 16


@flow(name="ingest", task_runner=ThreadPoolTaskRunner(max_workers=MAX_TASK_THREADS), validate_parameters=True)
def ingest(config: str = "ingest/sam", overrides: list[str] | None = None, force: bool = False,
           source: str | None = None, annotations: str | None = None, synset_mapping: str | None = None,
           output_root: str | None = None, max_shards: int | None = None, shards: list[str] | None = None,
           redo: Redo | None = None, workers: int | None = None):
    """Ingest every shard of one dataset into `<output_root>/manifests/<dataset>/`.

    Args:
        config: preset name (`sam`, `journeydb`, `imagenet`, or `ingest/<name>`) or a YAML path.
        overrides: `key=value` strings applied after the preset and the fields below (they win), e.g.
            `decode.verify=full`.
        force: re-ingest shards that are already committed.
        source: the dataset's archives: a directory, glob, links TSV or s3:// URL; empty: the preset's.
        annotations: JourneyDB: the annotation jsonl; empty: the preset's.
        synset_mapping: ImageNet: LOC_synset_mapping.txt; empty: the preset's.
        output_root: root of every output (local path or s3://...); empty: the preset's.
        max_shards: only the first N shards (smoke runs); empty: all.
        shards: only these shards, by name (e.g. sa_000001); empty: the preset's (all).
        redo: stale: do what is missing or stale; errors: also redo the error rows of committed shards.
        workers: shards processed at once; empty: the preset's.
    """
    typed = {"source": source, "annotations": annotations, "synset_mapping": synset_mapping,
             "output_root": output_root, "max_shards": max_shards, "shards": shards, "redo": redo, "workers": workers}
    return run_as_flow(IngestStage(), config, with_typed(overrides, typed), force)

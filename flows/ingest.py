"""Prefect flow `ingest`: one task per source shard, each writing a committed parquet manifest.

    prefect deployment run ingest/ingest-sam -p overrides='["source=/data/sa1b", "output_root=s3://bucket/pixart"]'

The work is `flows/ingest_stage.py` on the stage kit (`flows/_stage.py`), the same code `pixart ingest` runs
locally without a Prefect server. At most `workers` shard tasks run at a time; committed shards are skipped unless
`force`; transient failures are retried twice, permanent ones fail the shard at once; a failed shard, or one that
another live run still holds, fails the run at the end (naming it), after every other shard.
Artifacts: `ingest-<dataset>-shards` (table), `-summary`, `-progress`.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows._prefect import run_as_flow
from flows.ingest_stage import IngestStage

MAX_TASK_THREADS = 16


@flow(name="ingest", task_runner=ThreadPoolTaskRunner(max_workers=MAX_TASK_THREADS), validate_parameters=True)
def ingest(config: str = "ingest/sam", overrides: list[str] | None = None, force: bool = False):
    """Ingest every shard of one dataset into `<output_root>/manifests/<dataset>/`.

    Args:
        config: preset name (`sam`, `journeydb`, `imagenet`, or `ingest/<name>`) or a YAML path.
        overrides: `key=value` strings applied after the preset, e.g. `source=s3://bucket/sa1b`.
        force: re-ingest shards that are already committed.
    """
    return run_as_flow(IngestStage(), config, overrides, force)

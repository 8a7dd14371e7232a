"""Prefect flow `ingest`: one task per source shard, each writing a committed parquet manifest.

    prefect deployment run ingest/ingest-sam -p overrides='["source=/data/sa1b", "output_root=s3://bucket/pixart"]'
    pixart ingest sam source=/data/sa1b            # the same flow, run in-process

The flow lists shards, runs at most `workers` shard tasks at a time, and finishes with a table artifact and a
markdown summary. Committed shards are skipped unless `force`. A shard that still fails after its retries fails
the run at the end, after every other shard has been processed.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

from storage.commit import write_atomic
from storage.config import IngestConfig
from storage.configio import dump_yaml, load_config
from storage.errors import PipelineError
from storage.ingest import ShardResult, ingest_shard, ingest_shard_record, list_shards, prepare
from storage.manifest import manifest_dir
from storage.sources.base import SourceShard
from storage.urls import describe_error, join

MAX_TASK_THREADS = 16


@task(name="ingest-shard", task_run_name="ingest-{shard.name}", retries=2, retry_delay_seconds=[5, 30],
      cache_policy=NO_CACHE, tags=["ingest"])
def ingest_shard_task(shard: SourceShard, cfg: IngestConfig, progress=None, pool=None) -> dict[str, Any]:
    """Retry-safe: a committed shard is skipped, a half-written one was never published. With a process `pool`
    the work runs in a worker process (decoding and hashing scale past the GIL)."""
    if pool is not None:
        return pool.submit(ingest_shard_record, shard, cfg).result()
    return ingest_shard(shard, cfg, progress).to_dict()


def _report(cfg: IngestConfig, results: list[dict[str, Any]], failed: dict[str, str], extra: dict[str, Any]) -> str:
    ok = sum(r["num_ok"] for r in results)
    bad = sum(r["num_error"] for r in results)
    lines = [f"# Ingest `{cfg.dataset}`", "", f"- source: `{cfg.source}`",
             f"- manifests: `{manifest_dir(cfg.output_root, cfg.dataset)}`",
             f"- shards: {len(results)} done ({sum(r['skipped'] for r in results)} already committed), "
             f"{len(failed)} failed", f"- samples: {ok} ok, {bad} error rows"]
    if extra.get("num_error"):
        lines.append(f"- annotation lines rejected: {extra['num_error']} (first: {extra['errors'][0]})")
    lines += [f"- FAILED `{name}`: {why}" for name, why in failed.items()]
    return "\n".join(lines)


@flow(name="ingest", task_runner=ThreadPoolTaskRunner(max_workers=MAX_TASK_THREADS), validate_parameters=True)
def ingest(config: str = "ingest/sam", overrides: list[str] | None = None, force: bool = False):
    """Ingest every shard of one dataset into `<output_root>/manifests/<dataset>/`.

    Args:
        config: preset name (`sam`, `journeydb`, `imagenet`, or `ingest/<name>`) or a YAML path.
        overrides: `key=value` strings applied after the preset, e.g. `source=s3://bucket/sa1b`.
        force: re-ingest shards that are already committed.
    """
    logger = get_run_logger()
    where = config
    try:
        cfg = load_config(IngestConfig, config, (overrides or []) + (["force=true"] if force else []), kind="ingest")
        where = cfg.source
        shards = list_shards(cfg)
        extra = prepare(cfg)
        where = cfg.output_root
        write_atomic(join(manifest_dir(cfg.output_root, cfg.dataset), "config.resolved.yaml"), dump_yaml(cfg).encode())
    except (PipelineError, OSError) as e:  # bad config, source or output root: one clear line, no traceback
        message = str(e) if isinstance(e, PipelineError) else describe_error(where, e)
        logger.error(message)
        return Failed(message=message)
    logger.info("ingest %s: %d shards from %s -> %s", cfg.dataset, len(shards), cfg.source, cfg.output_root)

    results: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    lock, counts = threading.Lock(), {"images": 0}
    bar = tqdm(total=len(shards), unit="shard", desc=f"ingest {cfg.dataset}", disable=None)

    def on_sample(n: int) -> None:
        with lock:
            counts["images"] += n
            if counts["images"] % 256 == 0:
                bar.set_postfix(images=counts["images"], refresh=False)

    pool = (ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"))
            if cfg.worker_type == "process" and shards else None)
    pending = list(reversed(shards))
    running = {}
    while pending or running:
        while pending and len(running) < cfg.workers:
            shard = pending.pop()
            running[ingest_shard_task.submit(shard, cfg, on_sample, pool)] = shard
        future = next(as_completed(list(running)))
        shard = running.pop(future)
        try:
            res = future.result()
        except Exception as e:  # noqa: BLE001 - one shard's failure must not stop the others
            failed[shard.name] = f"{e.__class__.__name__}: {e}"
            logger.error("%s failed after retries: %s", shard.name, failed[shard.name])
        else:
            results.append(res)
            if pool is not None and not res["skipped"]:
                on_sample(res["num_ok"] + res["num_error"])
            logger.info("%s: %d ok, %d errors%s", shard.name, res["num_ok"], res["num_error"],
                        " (already committed)" if res["skipped"] else "")
        bar.update(1)
        bar.set_postfix(images=counts["images"], errors=sum(r["num_error"] for r in results))
    bar.close()
    if pool is not None:
        pool.shutdown()

    key = f"ingest-{cfg.dataset}".lower()
    fields = [f for f in ShardResult.__dataclass_fields__ if f not in ("dataset", "config_hash")]
    create_table_artifact([{f: r[f] for f in fields} for r in results], key=key + "-shards",
                          description=f"ingest {cfg.dataset}: one row per shard")
    summary = _report(cfg, results, failed, extra)
    create_markdown_artifact(summary, key=key + "-summary", description=f"ingest {cfg.dataset} summary")
    outcome = {"dataset": cfg.dataset, "shards": len(shards), "done": len(results),
               "skipped": sum(r["skipped"] for r in results), "failed": sorted(failed),
               "num_ok": sum(r["num_ok"] for r in results), "num_error": sum(r["num_error"] for r in results)}
    if failed:
        return Failed(message=f"{len(failed)} of {len(shards)} shards failed: {', '.join(sorted(failed))}")
    return Completed(message=f"{outcome['num_ok']} samples ok, {outcome['num_error']} error rows", data=outcome)

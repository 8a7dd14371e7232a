"""Prefect flow `caption`: LLaVA captions for every committed manifest shard of SA-1B or JourneyDB.

    prefect deployment run caption/caption-sam -p overrides='["output_root=/data/pixart"]'
    pixart caption sam output_root=/data/pixart executor=ray ray.num_replicas=8

executor=local loads one model in this process and runs one task per shard (with retries); executor=ray streams all
pending shards through a Ray Data actor pool, one replica per GPU (`flows/_ray_caption.py`). Both write through the
same `ShardAssembler`, so every manifest key ends with exactly one caption or error row. Artifacts: progress,
a table of sample captions, and a caption-quality report (also saved as quality.md beside the captions).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

from captioning.audit import audit_caption_set
from captioning.config import CaptionConfig
from captioning.quality import QualityAccumulator, quality_markdown
from captioning.records import caption_set_dir, ensure_caption_set
from captioning.shard import pending_manifests
from storage.commit import write_atomic
from storage.configio import dump_yaml, load_config
from storage.errors import PipelineError
from storage.manifest import committed_manifests, manifest_dir
from storage.urls import describe_error, filesystem, join

SAMPLE_ROWS = 20


@task(name="caption-shard", task_run_name="caption-{shard}", retries=2, retry_delay_seconds=[10, 60],
      cache_policy=NO_CACHE, tags=["caption", "gpu"])
def caption_shard_task(manifest_url: str, shard: str, runner, upcoming: str | None, progress=None) -> dict:
    """Retry-safe: committed parts are kept, so a retry captions only the keys still missing."""
    return runner.run(manifest_url, progress, upcoming).to_dict()


def _run_local(pending: list[str], cfg: CaptionConfig, on_shard) -> dict[str, str]:
    from captioning.captioner import Captioner
    from captioning.runner import CaptionRunner
    from captioning.text import T5TokenCounter

    try:
        runner = CaptionRunner(cfg, Captioner(cfg), T5TokenCounter(cfg.t5_tokenizer))
    except (OSError, ValueError) as e:  # unknown id, no network for a hub id, broken checkpoint
        raise PipelineError(f"cannot load model {cfg.model!r} or tokenizer {cfg.t5_tokenizer!r}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__}") from None
    failed: dict[str, str] = {}
    bar = tqdm(unit="img", desc=f"caption {cfg.dataset}", disable=None)
    try:
        for i, url in enumerate(pending):
            shard = url.rsplit("/", 1)[-1].removesuffix(".parquet")
            upcoming = pending[i + 1] if i + 1 < len(pending) else None
            try:
                on_shard(caption_shard_task(url, shard, runner, upcoming, bar.update))
            except Exception as e:  # noqa: BLE001 - one shard's failure must not stop the others
                failed[shard] = f"{e.__class__.__name__}: {e}"
    finally:
        runner.close()
        bar.close()
    return failed


QUALITY_COLUMNS = ["key", "caption", "t5_tokens", "t5_truncated", "degenerate", "status", "error"]


def _quality_of_set(cfg: CaptionConfig, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Quality statistics over every committed shard of the set (read shard by shard), and a few sample rows."""
    fs, path = filesystem(caption_set_dir(cfg.output_root, cfg.dataset, name))
    acc, sample = QualityAccumulator(cfg.max_t5_tokens), []
    for p in sorted(fs.glob(f"{path}/*.parquet")):
        if fs.exists(p + ".done"):
            with fs.open(p, "rb") as f:
                rows = pq.read_table(f, columns=QUALITY_COLUMNS).to_pylist()
            acc.add(rows)
            sample += rows[: max(0, SAMPLE_ROWS - len(sample))]
    return acc.stats(), sample


@flow(name="caption", task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=True)
def caption(config: str = "caption/sam", overrides: list[str] | None = None, force: bool = False):
    """Caption the committed manifests of one dataset into `<output_root>/captions/<dataset>/<caption_set>/`.

    Args:
        config: preset name (`sam`, `journeydb`, `caption/<name>`) or a YAML path.
        overrides: `key=value` strings applied after the preset, e.g. `model=/models/llava-1.5-7b-hf`.
        force: re-caption shards already committed in this caption set.
    """
    logger = get_run_logger()
    where = config
    try:
        cfg = load_config(CaptionConfig, config, (overrides or []) + (["force=true"] if force else []),
                          kind="caption")
        where = cfg.output_root
        name = ensure_caption_set(cfg)
        manifests = committed_manifests(cfg.output_root, cfg.dataset)[: cfg.max_shards]
        if not manifests:
            raise PipelineError(f"no committed manifests under {manifest_dir(cfg.output_root, cfg.dataset)}: "
                                f"run `pixart ingest {cfg.dataset}` first")
        set_dir = caption_set_dir(cfg.output_root, cfg.dataset, name)
        write_atomic(join(set_dir, "config.resolved.yaml"), dump_yaml(cfg).encode())
    except (PipelineError, OSError) as e:
        message = str(e) if isinstance(e, PipelineError) else describe_error(where, e)
        logger.error(message)
        return Failed(message=message)

    pending = pending_manifests(manifests, cfg)
    logger.info("caption %s into set %s: %d of %d shards pending, executor=%s", cfg.dataset, name, len(pending),
                len(manifests), cfg.executor)
    key = f"caption-{cfg.dataset}".lower()
    progress_id = create_progress_artifact(100.0 * (len(manifests) - len(pending)) / len(manifests),
                                           key=key + "-progress", description="shards committed")
    state = {"done": len(manifests) - len(pending), "images": 0, "seconds": 0.0}

    def on_shard(result: dict[str, Any]) -> None:
        state["done"] += 1
        state["images"] += result["num_ok"] + result["num_error"] - result["resumed_rows"]
        state["seconds"] += result["wall_seconds"]
        rate = state["images"] / max(1e-9, state["seconds"])
        update_progress_artifact(progress_id, 100.0 * state["done"] / len(manifests),
                                 description=f"{state['done']}/{len(manifests)} shards, {rate:.2f} images/s")
        logger.info("%s: %d captions, %d errors, %d degenerate (%.2f images/s overall)", result["shard"],
                    result["num_ok"], result["num_error"], result["num_degenerate"], rate)

    try:
        if cfg.executor == "ray":
            from flows._ray_caption import caption_on_ray

            failed = caption_on_ray(pending, cfg, on_shard)
        else:
            failed = _run_local(pending, cfg, on_shard)
    except PipelineError as e:
        logger.error(str(e))
        return Failed(message=str(e))

    stats, rows = _quality_of_set(cfg, name)
    report = quality_markdown(stats, f"{cfg.dataset} / {name}")
    write_atomic(join(set_dir, "quality.md"), report.encode())
    write_atomic(join(set_dir, "quality.json"), json.dumps(stats, indent=1).encode())
    create_markdown_artifact(report, key=key + "-quality", description="caption-quality report")
    sample = [{"key": r["key"], "caption": (r["caption"] or "")[:300], "t5_tokens": r["t5_tokens"],
               "degenerate": r["degenerate"], "error": r["error"]} for r in rows]
    create_table_artifact(sample, key=key + "-samples", description="sample captions")
    audit = audit_caption_set(cfg.output_root, cfg.dataset, name)
    outcome = {"dataset": cfg.dataset, "caption_set": name, "shards": len(manifests), "pending": len(pending),
               "failed": sorted(failed), "captions": stats["captions"], "errors": stats["errors"],
               "exactly_once": audit["ok"]}
    if failed:
        return Failed(message=f"{len(failed)} of {len(pending)} shards failed: "
                              + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:5]))
    return Completed(message=f"{stats['captions']} captions, {stats['errors']} error rows in {name}", data=outcome)

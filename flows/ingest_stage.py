"""The ingest stage: source shards -> parquet manifests (`storage.ingest.shard`), then dataset-wide duplicate marking.

Prefect-free; run by `pixart ingest` (LocalRuntime) and by the `ingest` Prefect flow (`flows/ingest.py`).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from flows._stage import Shard, Stage, StageOutcome, failure_message
from storage.configio import load_config
from storage.ingest.config import IngestConfig
from storage.ingest.dedupe import write_duplicates
from storage.ingest.shard import ingest_lineage, ingest_shard, ingest_shard_record, list_shards, prepare
from storage.layout import manifest_dir, manifest_url
from storage.shard import why_pending
from storage.urls import check_output_root


class IngestStage(Stage):
    name = "ingest"

    def __init__(self) -> None:
        self.pool: ProcessPoolExecutor | None = None
        self.ctx: dict[str, Any] = {}

    def load(self, config: str, overrides: list[str]) -> IngestConfig:
        return load_config(IngestConfig, config, overrides, kind="ingest")

    def output_dir(self, cfg: IngestConfig) -> str:
        return manifest_dir(cfg.output_root, cfg.dataset)

    def shards(self, cfg: IngestConfig, log) -> list[Shard]:
        shards = list_shards(cfg)
        check_output_root(cfg.output_root, cfg.create_bucket)
        self.ctx = prepare(cfg)
        if self.ctx.get("num_error"):
            log(f"annotation lines rejected: {self.ctx['num_error']} (first: {self.ctx['errors'][0]})")
        self.workers = cfg.workers
        listed = [Shard(s.name, s, "forced" if cfg.force else why_pending(
            manifest_url(cfg.output_root, cfg.dataset, s.name), ingest_lineage(s, cfg), cfg.redo == "errors"))
            for s in shards]
        pending = [s for s in listed if s.why]
        self.committed_before = len(listed) - len(pending)
        return pending

    def open(self, cfg: IngestConfig) -> None:
        if cfg.worker_type == "process":
            self.pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None

    def run_shard(self, shard: Shard, cfg: IngestConfig, progress) -> dict[str, Any]:
        """Retry-safe: a committed shard is skipped, a half-written one was never published."""
        if self.pool is None:
            return ingest_shard(shard.item, cfg, self.ctx, progress).to_dict()
        result = self.pool.submit(ingest_shard_record, shard.item, cfg, self.ctx).result()
        if not result["skipped"]:
            progress(result["num_ok"] + result["num_error"])
        return result

    def finish(self, cfg: IngestConfig, outcome: StageOutcome, runtime) -> str:
        dups = write_duplicates(cfg.output_root, cfg.dataset)
        outcome.extra["duplicates"] = dups["duplicates"]
        if dups["duplicates"]:
            runtime.log(f"{dups['duplicates']} keys already ingested from an earlier shard are listed as duplicates "
                        f"(shards {', '.join(dups['shards'][:5])})")
        key = f"ingest-{cfg.dataset}".lower()
        runtime.markdown(key + "-summary", report(cfg, outcome), f"ingest {cfg.dataset} summary")
        c = outcome.counts()
        if not outcome.ok:
            return failure_message(outcome)
        return f"{c['num_ok']} samples ok, {c['num_error']} error rows"


def report(cfg: IngestConfig, outcome: StageOutcome) -> str:
    c = outcome.counts()
    lines = [f"# Ingest `{cfg.dataset}`", "", f"- source: `{cfg.source}`",
             f"- manifests: `{manifest_dir(cfg.output_root, cfg.dataset)}`",
             f"- shards: {c['done']} done ({c['skipped']} already committed), {len(outcome.failed)} failed, "
             f"{len(outcome.busy)} busy in another run",
             f"- samples: {c['num_ok']} ok, {c['num_error']} error rows",
             f"- keys already ingested from another shard: {c.get('duplicates', 0)}"]
    lines += [f"- FAILED `{name}`: {why}" for name, why in outcome.failed.items()]
    lines += [f"- busy `{name}`: {why}" for name, why in outcome.busy.items()]
    return "\n".join(lines)

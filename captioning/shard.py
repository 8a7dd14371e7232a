"""One shard of captions on the stage kit's exactly-once shard (`storage.shard.PartitionedShard`).

    shard = CaptionShard(manifest_url, cfg, counter)     # lease + parts of earlier attempts; .todo: rows to do
    shard.accept([Outcome(key, text=..., n_tokens=...), Outcome(key, error="...")])   # from any executor
    shard.finalize()                                     # merge, exactly-once check, commit + marker

Captioning keeps only what is its own: the row schema (`captioning.records`), how an outcome becomes a row, and
its statistics. Both executors (`captioning.runner`, `flows/_ray_caption.py`) hand `Outcome`s to `accept`, so
row assembly and accounting exist once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from captioning.config import CaptionConfig
from captioning.records import CAPTION_SCHEMA, add_t5_counts, caption_row, error_row
from captioning.text import clean_caption, degenerate_reason
from storage.commit import is_done
from storage.configio import config_dict, config_hash
from storage.layout import caption_url, shard_of
from storage.manifest import read_manifest
from storage.shard import PartitionedShard, ShardResult, lineage, skipped

Row = dict[str, Any]


@dataclass
class Outcome:
    """What an executor learned about one manifest key: a generated caption, or why there is none."""

    key: str
    error: str | None = None
    text: str = ""
    n_tokens: int = 0
    finish_reason: str = ""
    seconds: float = 0.0


def output_url(manifest_url: str, cfg: CaptionConfig) -> str:
    return caption_url(cfg.output_root, cfg.dataset, cfg.resolved_caption_set(), shard_of(manifest_url))


def skipped_result(manifest_url: str, cfg: CaptionConfig) -> ShardResult | None:
    """The stored result when this shard is already committed in the caption set (and not forced), else None."""
    return None if cfg.force else skipped(output_url(manifest_url, cfg))


def pending_manifests(manifests: Iterable[str], cfg: CaptionConfig) -> list[str]:
    """Committed manifests whose caption shard is not committed yet (all of them with force)."""
    return [m for m in manifests if cfg.force or not is_done(output_url(m, cfg))]


def _count(rows: list[Row], result: ShardResult) -> None:
    result.stats["num_degenerate"] = sum(bool(r["degenerate"]) for r in rows)


class CaptionShard:
    """The captioning state of one manifest shard; see the module docstring."""

    def __init__(self, manifest_url: str, cfg: CaptionConfig, counter) -> None:
        self.cfg, self.manifest_url, self.counter = cfg, manifest_url, counter
        self.manifest_rows = read_manifest(manifest_url).to_pylist()
        self.by_key = {r["key"]: r for r in self.manifest_rows}
        result = ShardResult(stage="caption", dataset=cfg.dataset, shard=shard_of(manifest_url),
                             input_url=manifest_url, output_url=output_url(manifest_url, cfg),
                             config_hash=config_hash(cfg), stats={"generated_tokens": 0, "generate_seconds": 0.0})
        self.parts = PartitionedShard(result.output_url, list(self.by_key), CAPTION_SCHEMA, result,
                                      force=cfg.force, part_rows=cfg.part_rows)
        self.result = result
        try:
            todo = [self.by_key[k] for k in self.parts.todo]
            self.todo = [r for r in todo if r["status"] == "ok"]  # rows to read, decode and caption
            not_ingested = [Outcome(r["key"], error=f"not ingested: {r['error']}") for r in todo
                            if r["status"] != "ok"]
            if not_ingested:
                self.accept(not_ingested)
        except BaseException:
            self.parts.close()  # the lease goes with the failure; committed parts stay for the next attempt
            raise

    @property
    def name(self) -> str:
        return self.result.shard

    @property
    def complete(self) -> bool:
        return self.parts.complete

    def row(self, outcome: Outcome) -> Row:
        manifest_row = self.by_key[outcome.key]
        if outcome.error is not None:
            return error_row(manifest_row, self.cfg, outcome.error)
        text = clean_caption(outcome.text, self.cfg.prompt)
        self.result.stats["generated_tokens"] += outcome.n_tokens
        self.result.stats["generate_seconds"] += outcome.seconds
        return caption_row(manifest_row, self.cfg, caption=text, n_tokens=outcome.n_tokens,
                           finish_reason=outcome.finish_reason,
                           degenerate=degenerate_reason(text, outcome.finish_reason), seconds=outcome.seconds)

    def accept(self, outcomes: list[Outcome]) -> None:
        """Turn outcomes into rows (T5 counts per batch) and commit them as parts."""
        rows = [self.row(o) for o in outcomes]
        add_t5_counts(rows, self.counter, self.cfg.max_t5_tokens)
        self.parts.add(rows)

    def finalize(self) -> ShardResult:
        extra = {"manifest_url": self.manifest_url, "caption_set": self.cfg.resolved_caption_set(),
                 "config": config_dict(self.cfg),
                 "lineage": lineage([self.manifest_url], self.result.config_hash,
                                    {"captioner": self.cfg.model, "t5_tokenizer": self.cfg.t5_tokenizer})}
        self.result.stats["generate_seconds"] = round(self.result.stats["generate_seconds"], 3)
        return self.parts.finalize(extra, _count)

    def close(self) -> None:
        """Stop without finalizing: release the lease, keep committed parts for the next attempt."""
        self.parts.close()

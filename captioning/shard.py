"""One shard of captions on the stage kit's committed-shard writer (`storage.shard.ShardWriter`).

    shard = CaptionShard(manifest_url, cfg, counter)     # .done when current; else lease + parts; .todo: rows to do
    shard.accept([Outcome(key, text=..., n_tokens=...), Outcome(key, error="...")])   # from any executor
    shard.finalize()                                     # merge, exactly-once check, commit + marker

Captioning keeps only what is its own: the row schema (`captioning.records`), how an outcome becomes a row, and its
statistics. Both executors (`captioning.runner`, the Ray runtime `flows/_ray_stage.py`) hand `Outcome`s to
`accept`, so row assembly and accounting exist once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from captioning.config import CaptionConfig
from captioning.records import CAPTION_SCHEMA, add_t5_counts, caption_row, error_row
from captioning.text import clean_caption, degenerate_reason
from storage.configio import config_dict
from storage.ingest.dedupe import duplicate_error, duplicates_identity, duplicates_of
from storage.layout import caption_url, duplicates_url, shard_of
from storage.lineage import lineage
from storage.manifest import read_manifest
from storage.shard import OpenShard, Row, ShardResult, ShardWriter, committed_result, why_pending


@dataclass
class Outcome:
    """What an executor learned about one manifest key: a generated caption, or why there is none."""

    key: str
    error: str | None = None
    text: str = ""
    n_tokens: int = 0
    finish_reason: str = ""
    seconds: float = 0.0


def outcome_of(row: dict[str, Any]) -> Outcome:
    """The outcome in one row of the Ray Data form (`Captioner.__call__`: key, error, caption, n_tokens, ...)."""
    key = str(row["key"])
    if row["error"]:
        return Outcome(key, error=str(row["error"]))
    return Outcome(key, text=str(row["caption"]), n_tokens=int(row["n_tokens"]),
                   finish_reason=str(row["finish_reason"]), seconds=float(row["seconds"]))


def output_url(manifest_url: str, cfg: CaptionConfig) -> str:
    return caption_url(cfg.output_root, cfg.dataset, cfg.resolved_caption_set(), shard_of(manifest_url))


def caption_lineage(manifest_url: str, cfg: CaptionConfig, firsts: dict[str, str] | None = None) -> dict[str, Any]:
    """What a caption shard is made from: its manifest and its keys listed as duplicates (`firsts`, read when not
    given), the effective config, the captioner and T5 tokenizer."""
    shard = shard_of(manifest_url)
    if firsts is None:
        firsts = duplicates_of(cfg.output_root, cfg.dataset, shard)
    dups = {f"{duplicates_url(cfg.output_root, cfg.dataset)}#{shard}": duplicates_identity(firsts)}
    return lineage([manifest_url], cfg, {"captioner": cfg.model, "t5_tokenizer": cfg.t5_tokenizer}, extra_inputs=dups)


def skipped_result(manifest_url: str, cfg: CaptionConfig) -> ShardResult | None:
    """The stored result when this shard is committed in the caption set for the same lineage (and not forced)."""
    if cfg.force:
        return None
    return committed_result(output_url(manifest_url, cfg), caption_lineage(manifest_url, cfg), cfg.redo == "errors")


def pending_manifests(manifests: Iterable[str], cfg: CaptionConfig) -> dict[str, str]:
    """{manifest: why} for the committed manifests whose caption shard is missing or stale (all with force)."""
    out = {}
    for m in manifests:
        why = "forced" if cfg.force else why_pending(output_url(m, cfg), caption_lineage(m, cfg),
                                                     cfg.redo == "errors")
        if why:
            out[m] = why
    return out


def _count(rows: list[Row], result: ShardResult) -> None:
    result.stats["num_degenerate"] = sum(bool(r["degenerate"]) for r in rows)


class CaptionShard(OpenShard):
    """The captioning state of one manifest shard; see the module docstring."""

    def __init__(self, manifest_url: str, cfg: CaptionConfig, counter) -> None:
        self.cfg, self.manifest_url, self.counter = cfg, manifest_url, counter
        self.by_key: dict[str, Row] = {}
        self.firsts = duplicates_of(cfg.output_root, cfg.dataset, shard_of(manifest_url))  # key -> earlier shard
        result = ShardResult(stage="caption", dataset=cfg.dataset, shard=shard_of(manifest_url),
                             input_url=manifest_url, output_url=output_url(manifest_url, cfg),
                             stats={"generated_tokens": 0, "generate_seconds": 0.0})
        self.result = result
        self.writer = ShardWriter.open(result.output_url, self._keys, CAPTION_SCHEMA, result,
                                       caption_lineage(manifest_url, cfg, self.firsts), config=config_dict(cfg),
                                       force=cfg.force, redo_errors=cfg.redo == "errors",
                                       part_rows=cfg.part_rows)
        self.todo: list[Row] = []
        if self.done is not None:
            return
        try:
            todo = [self.by_key[k] for k in self.writer.todo]
            self.todo = [r for r in todo if r["status"] == "ok" and r["key"] not in self.firsts]  # to caption
            errors = [Outcome(r["key"], error=f"not ingested: {r['error']}") for r in todo if r["status"] != "ok"]
            errors += [Outcome(r["key"], error=duplicate_error(r["key"], self.firsts[r["key"]])) for r in todo
                       if r["status"] == "ok" and r["key"] in self.firsts]
            if errors:
                self.accept(errors)
        except BaseException:
            self.writer.abort()  # the lease goes with the failure; committed parts stay for the next attempt
            raise

    def _keys(self) -> list[str]:
        """The manifest's keys, read under the lease."""
        self.by_key = {r["key"]: r for r in read_manifest(self.manifest_url).to_pylist()}
        return list(self.by_key)

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
        add_t5_counts(rows, self.counter, self.cfg.max_tokens)
        self.writer.add(rows)

    def finalize(self) -> ShardResult:
        extra = {"manifest_url": self.manifest_url, "caption_set": self.cfg.resolved_caption_set()}
        self.result.stats["generate_seconds"] = round(self.result.stats["generate_seconds"], 3)
        return self.writer.finalize(extra, _count)


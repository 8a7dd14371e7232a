"""The caption stage: committed manifests -> LLaVA captions, one caption set per (model, prompt, generation).

Prefect-free; run by `pixart caption` (LocalRuntime) and by the `caption` Prefect flow (`flows/caption.py`).
executor=local loads one model in this process and runs shard after shard (decoding the next one ahead);
executor=ray streams every pending shard through a Ray Data actor pool (`ray_pipelines`, run by the one Ray
runtime of `flows/_ray_stage.py`). Both hand rows
to `captioning.shard.CaptionShard`, so every manifest key ends with exactly one caption or error row.
"""

from __future__ import annotations

import json
from typing import Any

from captioning.audit import audit_caption_set
from captioning.config import CaptionConfig
from captioning.images import prepared_rows
from captioning.quality import QualityAccumulator, quality_markdown
from captioning.records import ensure_caption_set
from captioning.shard import CaptionShard, outcome_of, pending_manifests
from flows._ray_stage import RayPipeline
from flows._stage import Shard, Stage, StageOutcome, failure_message, local_gpus, manifests_to_read
from storage.commit import is_done, write_atomic
from storage.configio import load_config
from storage.layout import caption_set_dir, shard_of
from storage.parquet import read_rows
from storage.urls import filesystem, join, to_url

SAMPLE_ROWS = 20
QUALITY_COLUMNS = ["key", "caption", "t5_tokens", "t5_truncated", "degenerate", "status", "error"]


class CaptionStage(Stage):
    name = "caption"

    def __init__(self) -> None:
        self.runner = None
        self.order: list[str] = []

    def load(self, config: str, overrides: list[str]) -> CaptionConfig:
        return load_config(CaptionConfig, config, overrides, kind="caption")

    def output_dir(self, cfg: CaptionConfig) -> str:
        return caption_set_dir(cfg.output_root, cfg.dataset, cfg.resolved_caption_set())

    def gpu_slots(self, cfg: CaptionConfig) -> int:
        return local_gpus(cfg)

    def shards(self, cfg: CaptionConfig, log) -> list[Shard]:
        manifests = manifests_to_read(cfg)
        self.manifests = manifests
        pending = pending_manifests(manifests, cfg)
        self.committed_before = len(manifests) - len(pending)
        log(f"caption {cfg.dataset} into set {cfg.resolved_caption_set()}: {len(pending)} of {len(manifests)} "
            f"shards pending, executor={cfg.executor}")
        self.order = list(pending)
        return [Shard(shard_of(u), u, why) for u, why in pending.items()]

    def open(self, cfg: CaptionConfig) -> None:
        if cfg.executor == "local":
            from captioning.captioner import Captioner
            from captioning.runner import CaptionRunner
            from captioning.text import T5TokenCounter

            # a model or tokenizer that cannot load raises ModelLoadError (a PipelineError) naming which one
            self.runner = CaptionRunner(cfg, Captioner(cfg), T5TokenCounter(cfg.t5_tokenizer))
        ensure_caption_set(cfg)  # only once the model loads: a failed start leaves no empty caption-set folder

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def run_shard(self, shard: Shard, cfg: CaptionConfig, progress) -> dict[str, Any]:
        """Retry-safe: committed parts are kept, so a retry captions only the keys still missing."""
        i = self.order.index(shard.item)
        upcoming = self.order[i + 1] if i + 1 < len(self.order) else None
        return self.runner.run(shard.item, progress, upcoming).to_dict()

    def ray_pipelines(self, cfg: CaptionConfig, shards: list[Shard]) -> list[RayPipeline]:
        """CPU tasks read and decode each shard's images; an actor pool of `Captioner` replicas generates."""
        from captioning.captioner import Captioner, load_processor
        from captioning.images import ImagePrep
        from captioning.text import T5TokenCounter

        prep = ImagePrep.from_processor(load_processor(cfg.model), cfg.pad_to_square, cfg.decode)
        counter = T5TokenCounter(cfg.t5_tokenizer)
        return [RayPipeline("", [s.item for s in shards], open=lambda u: CaptionShard(u, cfg, counter),
                            items=lambda s: [{"rows": json.dumps(s.todo, default=str)}] if s.todo else [],
                            accept=lambda s, rows: s.accept([outcome_of(r) for r in rows]),
                            read=prepared_rows, read_kwargs={"prep": prep}, num_cpus=cfg.ray.num_cpus_per_decoder,
                            model=Captioner, model_kwargs={"cfg": cfg}, batch_size=cfg.batch_size,
                            num_gpus=cfg.ray.num_gpus_per_replica, replicas=cfg.ray.num_replicas)]

    def finish(self, cfg: CaptionConfig, outcome: StageOutcome, runtime) -> str:
        name = cfg.resolved_caption_set()
        set_dir = caption_set_dir(cfg.output_root, cfg.dataset, name)
        stats, rows = quality_of_set(set_dir, cfg.max_tokens)
        report = quality_markdown(stats, f"{cfg.dataset} / {name}")
        write_atomic(join(set_dir, "quality.md"), report.encode())
        write_atomic(join(set_dir, "quality.json"), json.dumps(stats, indent=1).encode())
        key = f"caption-{cfg.dataset}".lower()
        runtime.markdown(key + "-quality", report, "caption-quality report")
        runtime.table(key + "-samples", [{"key": r["key"], "caption": (r["caption"] or "")[:300],
                                          "t5_tokens": r["t5_tokens"], "degenerate": r["degenerate"],
                                          "error": r["error"]} for r in rows], "sample captions")
        audit = audit_caption_set(cfg.output_root, cfg.dataset, name)
        outcome.extra.update(caption_set=name, captions=stats["captions"], errors=stats["errors"],
                             exactly_once=audit["ok"], pending=outcome.total, manifests=len(self.manifests))
        if not outcome.ok:
            return failure_message(outcome)
        return f"{stats['captions']} captions, {stats['errors']} error rows in {name}"


def quality_of_set(set_dir: str, max_tokens: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Quality statistics over every committed shard of the set (read shard by shard), and a few sample rows."""
    fs, path = filesystem(set_dir)
    acc, sample = QualityAccumulator(max_tokens), []
    for p in sorted(fs.glob(f"{path}/*.parquet")):
        url = to_url(fs, p)
        if is_done(url):
            rows = read_rows(url, QUALITY_COLUMNS)
            acc.add(rows)
            sample += rows[: max(0, SAMPLE_ROWS - len(sample))]
    return acc.stats(), sample


"""Ray Data glue for captioning: CPU tasks read and decode each shard's images while an actor pool of `Captioner`
replicas (one per GPU) generates; the driver assembles committed per-shard outputs as rows stream back.

    read+decode (flat_map over shards, num_cpus)  ->  Captioner actors (map_batches, num_gpus)  ->  driver:
    ShardAssembler.add -> parts -> finalize + done marker once a shard's keys are all back
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import ray
from ray.data import ActorPoolStrategy

from captioning.captioner import Captioner
from captioning.config import CaptionConfig
from captioning.images import ImagePrep, iter_prepared
from captioning.records import add_t5_counts, error_row
from captioning.shard import ShardAssembler, finished_row
from captioning.text import T5TokenCounter
from storage.errors import PipelineError


def _read_shard(item: dict[str, Any], prep: ImagePrep):
    for out in iter_prepared(json.loads(item["rows"]), prep):
        yield {"shard": item["shard"], **out}


def caption_on_ray(pending: list[str], cfg: CaptionConfig, on_shard: Callable[[dict], None]) -> dict[str, str]:
    """Caption the pending manifests on Ray; returns {shard: reason} for shards that did not complete."""
    from transformers import AutoProcessor

    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray.address, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        try:
            prep = ImagePrep.from_processor(AutoProcessor.from_pretrained(cfg.model), cfg.pad_to_square,
                                            cfg.decode.max_pixels)
            counter = T5TokenCounter(cfg.t5_tokenizer)
        except (OSError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise PipelineError(f"cannot load processor of {cfg.model!r} or tokenizer {cfg.t5_tokenizer!r}: "
                                f"{reason}") from None
        shards: dict[str, ShardAssembler] = {}
        items = []
        for url in pending:
            shard = ShardAssembler(url, cfg)
            shard.add([error_row(r, cfg, f"not ingested: {r['error']}") for r in shard.todo if r["status"] != "ok"])
            if shard.complete:
                on_shard(shard.finalize().to_dict())
                continue
            shards[shard.result.shard] = shard
            items.append({"shard": shard.result.shard, "rows": json.dumps([r for r in shard.todo
                                                                         if r["status"] == "ok"])})
        if not items:
            return {}
        ds = ray.data.from_items(items).flat_map(_read_shard, fn_kwargs={"prep": prep},
                                                 num_cpus=cfg.ray.num_cpus_per_decoder)
        ds = ds.map_batches(Captioner, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.batch_size,
                            batch_format="numpy", num_gpus=cfg.ray.num_gpus_per_replica,
                            compute=ActorPoolStrategy(size=cfg.ray.num_replicas))
        by_key = {name: {r["key"]: r for r in s.todo} for name, s in shards.items()}
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                grouped: dict[str, list[dict]] = {}
                for i in range(len(batch["key"])):
                    name, key = str(batch["shard"][i]), str(batch["key"][i])
                    row = by_key[name][key]
                    if batch["error"][i]:
                        out = error_row(row, cfg, str(batch["error"][i]))
                    else:
                        out = finished_row(row, cfg, str(batch["caption"][i]), int(batch["n_tokens"][i]),
                                           str(batch["finish_reason"][i]), float(batch["seconds"][i]))
                        shards[name].result.generated_tokens += out["n_tokens"]
                        shards[name].result.generate_seconds += out["seconds"]
                    grouped.setdefault(name, []).append(out)
                for name, rows in grouped.items():
                    add_t5_counts(rows, counter, cfg.max_t5_tokens)
                    shards[name].add(rows)
                    if shards[name].complete:
                        on_shard(shards.pop(name).finalize().to_dict())
        except Exception as e:  # noqa: BLE001 - committed parts survive; the listed shards resume on the next run
            return {name: f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}" for name in shards}
        return {name: "rows missing after the Ray pipeline finished" for name in shards}
    finally:
        if started:
            ray.shutdown()

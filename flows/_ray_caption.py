"""Ray Data glue for captioning: CPU tasks read and decode each shard's images while an actor pool of `Captioner`
replicas (one per GPU) generates; the driver hands the results to each shard's `CaptionShard`.

    read+decode (flat_map over shards, num_cpus)  ->  Captioner actors (map_batches, num_gpus)  ->  driver:
    Outcome per row -> CaptionShard.accept -> parts -> finalize + done marker once a shard's keys are all back

Row assembly, statistics and commits are `captioning.shard`'s, exactly as in the local executor; this file only
maps them onto Ray.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import ray
from ray.data import ActorPoolStrategy

from captioning.captioner import Captioner, load_processor
from captioning.config import CaptionConfig
from captioning.images import ImagePrep, iter_prepared
from captioning.shard import CaptionShard, Outcome
from captioning.text import T5TokenCounter
from flows._ray import ray_session
from storage.errors import PipelineError
from storage.layout import shard_of


def _read_shard(item: dict[str, Any], prep: ImagePrep):
    for out in iter_prepared(json.loads(item["rows"]), prep):
        yield {"shard": item["shard"], **out}


def _outcome(batch: dict[str, Any], i: int) -> Outcome:
    key = str(batch["key"][i])
    if batch["error"][i]:
        return Outcome(key, error=str(batch["error"][i]))
    return Outcome(key, text=str(batch["caption"][i]), n_tokens=int(batch["n_tokens"][i]),
                   finish_reason=str(batch["finish_reason"][i]), seconds=float(batch["seconds"][i]))


def caption_on_ray(pending: list[str], cfg: CaptionConfig,
                   on_shard: Callable[[dict], None]) -> dict[str, BaseException]:
    """Caption the pending manifests on Ray; returns {shard: error} for every shard that did not complete (a
    ShardBusyError for one another run holds), so that no shard is left out of the run's outcome."""
    with ray_session(cfg.ray.address):
        return _caption(pending, cfg, on_shard)


def _caption(pending: list[str], cfg: CaptionConfig,
             on_shard: Callable[[dict], None]) -> dict[str, BaseException]:
    ray.data.DataContext.get_current().enable_progress_bars = False
    shards: dict[str, CaptionShard] = {}
    failed: dict[str, BaseException] = {}
    try:
        prep = ImagePrep.from_processor(load_processor(cfg.model), cfg.pad_to_square, cfg.decode)
        counter = T5TokenCounter(cfg.t5_tokenizer)
        items = []
        for url in pending:
            try:
                shard = CaptionShard(url, cfg, counter)  # releases its lease itself when it raises
                if shard.complete:
                    on_shard(shard.finalize().to_dict())  # releases the lease, committed or not
                    continue
            except Exception as e:  # noqa: BLE001 - busy in another run, or a bad manifest: this shard only
                failed[shard_of(url)] = e
                continue
            shards[shard.name] = shard
            items.append({"shard": shard.name, "rows": json.dumps(shard.todo)})
        if not items:
            return failed
        ds = ray.data.from_items(items).flat_map(_read_shard, fn_kwargs={"prep": prep},
                                                 num_cpus=cfg.ray.num_cpus_per_decoder)
        ds = ds.map_batches(Captioner, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.batch_size,
                            batch_format="numpy", num_gpus=cfg.ray.num_gpus_per_replica,
                            compute=ActorPoolStrategy(size=cfg.ray.num_replicas))
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                grouped: dict[str, list[Outcome]] = {}
                for i in range(len(batch["key"])):
                    grouped.setdefault(str(batch["shard"][i]), []).append(_outcome(batch, i))
                for name, outcomes in grouped.items():
                    shards[name].accept(outcomes)
                    if shards[name].complete:
                        shard = shards.pop(name)
                        try:
                            result = shard.finalize()
                        except Exception as e:  # noqa: BLE001 - this shard failed; the others go on
                            failed[name] = e
                        else:
                            on_shard(result.to_dict())
        except Exception as e:  # noqa: BLE001 - committed parts survive; the listed shards resume on the next run
            failed.update({name: e for name in shards})
            return failed
        failed.update({name: PipelineError("rows missing after the Ray pipeline finished") for name in shards})
        return failed
    finally:
        for shard in shards.values():
            shard.close()

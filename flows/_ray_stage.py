"""The one Ray Data runtime of every sharded stage: it only distributes. A stage describes each of its pipelines
with a `RayPipeline`; this module opens the shards on the driver, streams their work items through CPU tasks and
a GPU actor pool, hands each result back to its shard, and finalizes a shard as soon as its last key is back.

    open(url) -> shard          (driver: the stage's shard object, on the kit's ShardWriter: .done, .todo, ...)
    items(shard) -> [item]      (driver: JSON-able work per shard, e.g. its rows, or its caption chunks)
    read(item) -> rows          (CPU tasks, flat_map: decode and crop; None passes items straight on)
    model(batch) -> batch       (actor pool, map_batches: one replica per `num_gpus`)
    accept(shard, rows)         (driver: rows of one shard back into its writer)

A shard object has `done` (its stored result when committed for the same lineage), `complete`, `finalize()` and
`abort()`. A shard whose rows do not all come back fails with "rows missing after the Ray pipeline finished";
its committed parts stay for the next attempt. Transient failures (a killed worker, a busy lease) are retried as
the local runtime retries them: the failed shards run again after the same delays.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flows._ray import ray_session
from storage.errors import PipelineError, is_transient
from storage.layout import shard_of


@dataclass
class RayPipeline:
    prefix: str  # shard names in the outcome are prefix + input shard name
    urls: list[str]
    open: Callable[[str], Any]
    items: Callable[[Any], list[dict[str, Any]]]
    accept: Callable[[Any, list[dict[str, Any]]], None]
    model: type
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    read: Callable[..., Iterator[dict[str, Any]]] | None = None
    read_kwargs: dict[str, Any] = field(default_factory=dict)
    num_cpus: float = 1.0
    num_gpus: float = 1.0
    replicas: int = 1
    batch_size: int = 1
    accelerator_type: str | None = None


def run_on_ray(pipelines: list[RayPipeline], address: str | None, on_done: Callable[[str, dict], None],
               delays: tuple[float, ...] = (5.0, 30.0), log: Callable[[str], None] | None = None
               ) -> dict[str, BaseException]:
    """Run every pipeline; `on_done(name, result)` per committed shard. Returns {name: error} for every other
    shard (a ShardBusyError for one another run holds), so that no shard is left out of the run's outcome."""
    import ray

    with ray_session(address):
        ray.data.DataContext.get_current().enable_progress_bars = False
        failed: dict[str, BaseException] = {}
        for pipeline in pipelines:
            urls = pipeline.urls
            for attempt in range(len(delays) + 1):
                errors = _run(pipeline, urls, on_done)
                retry = {n: e for n, e in errors.items() if is_transient(e)}
                if attempt == len(delays) or not retry:
                    failed.update(errors)
                    break
                failed.update({n: e for n, e in errors.items() if n not in retry})
                if log is not None:
                    log(f"{len(retry)} shards failed transiently ({next(iter(retry.values()))}); retrying them in "
                        f"{delays[attempt]:.0f} s")
                time.sleep(delays[attempt])
                urls = [u for u in pipeline.urls if pipeline.prefix + shard_of(u) in retry]
        return failed


def _read(item: dict[str, Any], read, kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A CPU task: the stage's `read` over one item, each output row tagged with the item's shard."""
    for row in read(item, **kwargs):
        yield {"shard": item["shard"], **row}


def _run(p: RayPipeline, urls: list[str], on_done) -> dict[str, BaseException]:
    import ray
    from ray.data import ActorPoolStrategy

    failed: dict[str, BaseException] = {}
    shards: dict[str, Any] = {}

    def finalize(name: str) -> None:
        shard = shards.pop(name)
        try:
            result = shard.finalize()  # releases the lease, committed or not
        except Exception as e:  # noqa: BLE001 - this shard failed; the others go on
            failed[name] = e
        else:
            on_done(name, result.to_dict())

    try:
        items = []
        for url in urls:
            name = p.prefix + shard_of(url)
            try:
                shard = p.open(url)  # releases its lease itself when it raises
            except Exception as e:  # noqa: BLE001 - busy in another run, or bad input: this shard only
                failed[name] = e
                continue
            if shard.done is not None:
                on_done(name, shard.done.to_dict())
                continue
            shards[name] = shard
            work = p.items(shard)
            if shard.complete or not work:
                finalize(name)
            else:
                items += [{"shard": name, **item} for item in work]
        if items:
            ds = ray.data.from_items(items)
            if p.read is not None:
                ds = ds.flat_map(_read, fn_kwargs={"read": p.read, "kwargs": p.read_kwargs}, num_cpus=p.num_cpus)
            ds = ds.map_batches(p.model, fn_constructor_kwargs=p.model_kwargs, batch_size=p.batch_size,
                                batch_format="numpy", num_gpus=p.num_gpus, accelerator_type=p.accelerator_type,
                                compute=ActorPoolStrategy(size=p.replicas))
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                rows: dict[str, list[dict[str, Any]]] = {}
                for i in range(len(batch["shard"])):
                    row = {k: v[i] for k, v in batch.items()}
                    rows.setdefault(str(row["shard"]), []).append(row)
                for name, got in rows.items():
                    p.accept(shards[name], got)
                    if shards[name].complete:
                        finalize(name)
        failed.update({n: PipelineError("rows missing after the Ray pipeline finished") for n in shards})
    except Exception as e:  # noqa: BLE001 - committed parts survive; the listed shards resume on the next run
        failed.update({n: e for n in shards})
    finally:
        for shard in shards.values():
            shard.abort()
    return failed

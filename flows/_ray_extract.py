"""Ray Data glue for feature extraction: CPU tasks read, decode and crop images into bucket groups; one actor pool
of T5 encoders and one of VAE encoders (one replica per GPU each, optionally on different GPU types) encode; the
driver hands the results to each shard's `TextShard` / `LatentShard`, which write and commit exactly as the local
loop does (`pixart/features/extract.py`).

    text:    caption chunks (driver)          -> T5 actors (map_batches)  -> TextShard.accept -> finish
    latents: manifest rows -> bucket_groups (flat_map, CPU tasks) -> VAE actors -> LatentShard.accept -> finish

Arrays cross Ray as npy bytes (allow_pickle=False), so rows of different buckets share one schema.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from flows._ray import ray_session
from pixart.features.config import ExtractConfig
from pixart.features.encoders import LatentEncoder, TextEncoder
from pixart.features.extract import LatentShard, TextShard, bucket_groups, npy_bytes
from storage.errors import PipelineError


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class _T5Actor:
    def __init__(self, cfg: ExtractConfig) -> None:
        self.encoder = TextEncoder(cfg.t5_model, cfg.max_tokens, cfg.device, cfg.dtype)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        feats = []
        for texts in batch["texts"]:
            out = self.encoder.encode(json.loads(texts))
            feats.append(npy_bytes(np.concatenate(out)) + b"|" + json.dumps([len(f) for f in out]).encode())
        return {"shard": batch["shard"], "keys": batch["keys"], "texts": batch["texts"], "feats": feats}


class _VaeActor:
    def __init__(self, cfg: ExtractConfig) -> None:
        self.encoder = LatentEncoder(cfg.vae_model, cfg.device, cfg.dtype)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        means, stds = [], []
        for error, pixels in zip(batch["error"], batch["pixels"], strict=True):
            if error:
                means.append(b"")
                stds.append(b"")
                continue
            mean, std = self.encoder.encode(list(_npy(pixels)))
            means.append(npy_bytes(mean))
            stds.append(npy_bytes(std))
        return {**{k: batch[k] for k in ("shard", "keys", "metas", "error")}, "mean": means, "std": stds}


def _groups(item: dict[str, Any], cfg: ExtractConfig):
    for g in bucket_groups(json.loads(item["rows"]), cfg, cfg.vae_batch_size(cfg.ray.num_gpus_per_replica > 0)):
        if "error" in g:
            yield {"shard": item["shard"], "keys": json.dumps([g["key"]]), "metas": "[]", "error": g["error"],
                   "pixels": b""}
        else:
            yield {"shard": item["shard"], "keys": json.dumps(g["keys"]), "metas": json.dumps(g["metas"]),
                   "error": "", "pixels": npy_bytes(g["pixels"])}


def _open(kind, prefix: str, urls: list[str], cfg: ExtractConfig, on_done,
          failed: dict[str, BaseException]) -> dict[str, Any]:
    shards = {}
    for url in urls:
        try:
            shard = kind(url, cfg)  # releases its lease itself when it raises
        except Exception as e:  # noqa: BLE001 - busy in another run, or bad input: this shard only
            failed[prefix + url.rsplit("/", 1)[-1].removesuffix(".parquet")] = e
            continue
        if shard.done is not None:
            on_done(shard.done.shard, shard.done.to_dict())
        else:
            shards[shard.name] = shard
    return shards


def _finish(shards: dict[str, Any], name: str, remaining: dict[str, int], on_done, failed: dict[str, BaseException],
            prefix: str) -> None:
    if remaining[name] == 0:
        shard = shards.pop(name)
        try:
            result = shard.finish()  # releases the lease, committed or not
        except Exception as e:  # noqa: BLE001 - this shard failed; the others go on
            failed[prefix + name] = e
        else:
            on_done(name, result.to_dict())


def extract_on_ray(text_urls: list[str], manifest_urls: list[str], cfg: ExtractConfig,
                   on_done: Callable[[str, dict], None]) -> dict[str, BaseException]:
    """Extract on Ray; calls on_done(kind-shard name, result) per committed shard; returns {name: error} for every
    other shard (a ShardBusyError for one another run holds), so that no shard is left out of the outcome."""
    with ray_session(cfg.ray.address):
        return _extract(text_urls, manifest_urls, cfg, on_done)


def _extract(text_urls: list[str], manifest_urls: list[str], cfg: ExtractConfig,
             on_done: Callable[[str, dict], None]) -> dict[str, BaseException]:
    ray.data.DataContext.get_current().enable_progress_bars = False
    failed: dict[str, BaseException] = {}
    open_shards: list[tuple[str, dict[str, Any]]] = []
    try:
        text = _open(TextShard, "text-", text_urls, cfg, lambda n, r: on_done(f"text-{n}", r), failed)
        open_shards.append(("text-", text))
        items = [{"shard": n, "keys": json.dumps(k), "texts": json.dumps(t)} for n, s in text.items()
                 for k, t in s.chunks()]
        remaining = {n: len(s.todo) for n, s in text.items()}
        for n in list(text):
            _finish(text, n, remaining, lambda n, r: on_done(f"text-{n}", r), failed, "text-")
        if items:
            ds = ray.data.from_items(items).map_batches(
                _T5Actor, fn_constructor_kwargs={"cfg": cfg}, batch_size=1, num_gpus=cfg.ray.num_gpus_per_replica,
                accelerator_type=cfg.ray.t5_accelerator_type, compute=ActorPoolStrategy(size=cfg.ray.t5_replicas))
            for row in ds.iter_rows():
                name, keys, texts = row["shard"], json.loads(row["keys"]), json.loads(row["texts"])
                blob, lengths = row["feats"].rsplit(b"|", 1)
                flat = _npy(blob)
                cuts = np.cumsum([0, *json.loads(lengths)])
                text[name].accept(keys, texts, [flat[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
                remaining[name] -= len(keys)
                _finish(text, name, remaining, lambda n, r: on_done(f"text-{n}", r), failed, "text-")

        latents = _open(LatentShard, "latents-", manifest_urls, cfg, lambda n, r: on_done(f"latents-{n}", r), failed)
        open_shards.append(("latents-", latents))
        remaining = {n: len(s.todo) for n, s in latents.items()}
        for n in list(latents):
            _finish(latents, n, remaining, lambda n, r: on_done(f"latents-{n}", r), failed, "latents-")
        items = [{"shard": n, "rows": json.dumps(s.todo, default=str)} for n, s in latents.items()]
        if items:
            ds = ray.data.from_items(items).flat_map(_groups, fn_kwargs={"cfg": cfg},
                                                     num_cpus=cfg.ray.num_cpus_per_decoder)
            ds = ds.map_batches(_VaeActor, fn_constructor_kwargs={"cfg": cfg}, batch_size=1,
                                num_gpus=cfg.ray.num_gpus_per_replica, accelerator_type=cfg.ray.vae_accelerator_type,
                                compute=ActorPoolStrategy(size=cfg.ray.vae_replicas))
            for row in ds.iter_rows():
                name, keys = row["shard"], json.loads(row["keys"])
                if row["error"]:
                    latents[name].error(keys[0], row["error"])
                else:
                    group = {"keys": keys, "metas": json.loads(row["metas"])}
                    latents[name].accept(group, _npy(row["mean"]), _npy(row["std"]))
                remaining[name] -= len(keys)
                _finish(latents, name, remaining, lambda n, r: on_done(f"latents-{n}", r), failed, "latents-")
        for prefix, shards in open_shards:
            failed.update({prefix + n: PipelineError("rows missing after the Ray pipeline finished") for n in shards})
        return failed
    except Exception as e:  # noqa: BLE001 - nothing uncommitted is published; the listed shards rerun next time
        for prefix, shards in open_shards:
            failed.update({prefix + n: e for n in shards})
        return failed
    finally:
        for _, shards in open_shards:
            for shard in shards.values():
                shard.abort(RuntimeError("extraction did not finish"))

"""The extract stage: T5 text features of a caption set and VAE latents of a dataset (`pixart.features.extract`).

Prefect-free; run by `pixart extract` (LocalRuntime) and by the `extract` Prefect flow (`flows/extract.py`).
Shards are caption shards (text) and manifest shards (latents); both kinds run through the same skeleton, with the
encoders loaded once. After the shards: the bucket histogram of the dataset at this base size (parquet + PNG
beside the latents, and an artifact).
"""

from __future__ import annotations

import json
from typing import Any

from flows._ray_stage import RayPipeline
from flows._stage import Shard, Stage, StageOutcome, failure_message, local_gpus, manifests_to_read
from pixart.features.bucket_report import bucket_histogram, histogram_png
from pixart.features.config import ExtractConfig
from pixart.features.estimate import estimate, t5_width
from pixart.features.extract import (
    LatentShard,
    TextShard,
    extract_latent_shard,
    extract_text_shard,
    latent_group_rows,
    pending,
)
from storage.commit import commit_shard, is_done, write_atomic
from storage.configio import load_config
from storage.errors import PipelineError
from storage.layout import caption_set_dir, caption_set_record_url, captions_dir, features_dir, latents_dir, shard_of
from storage.manifest import committed_manifests, read_manifest
from storage.parquet import read_table, write_table
from storage.urls import exists, filesystem, join, to_url


def committed_captions(cfg: ExtractConfig) -> list[str]:
    set_dir = caption_set_dir(cfg.output_root, cfg.dataset, cfg.caption_set or "")
    if not exists(caption_set_record_url(cfg.output_root, cfg.dataset, cfg.caption_set or "")):
        where = captions_dir(cfg.output_root, cfg.dataset)
        raise PipelineError(f"no caption set {cfg.caption_set!r} under {where}: run `pixart caption {cfg.dataset}` "
                            f"first or pass caption_set=<name>")
    fs, path = filesystem(set_dir)
    urls = [to_url(fs, p) for p in sorted(fs.glob(f"{path}/*.parquet"))]
    return [u for u in urls if is_done(u)]


class ExtractStage(Stage):
    name = "extract"

    def __init__(self) -> None:
        self.text = self.latents = None

    def load(self, config: str, overrides: list[str]) -> ExtractConfig:
        return load_config(ExtractConfig, config, overrides, kind="extract")

    def output_dir(self, cfg: ExtractConfig) -> str:
        return features_dir(cfg.output_root, cfg.dataset)

    def gpu_slots(self, cfg: ExtractConfig) -> int:
        return local_gpus(cfg)

    def shards(self, cfg: ExtractConfig, log) -> list[Shard]:
        manifests = manifests_to_read(cfg)
        listed = []
        if cfg.encodes_text:
            listed += [Shard(f"text-{shard_of(u)}", ("text", u)) for u in committed_captions(cfg)[: cfg.max_shards]]
        if cfg.what in ("latents", "both"):
            listed += [Shard(f"latents-{shard_of(u)}", ("latents", u)) for u in manifests]
        for s in listed:
            s.why = pending(*s.item, cfg) or ""  # missing, or made from other inputs or settings
        shards = [s for s in listed if s.why]
        self.committed_before = len(listed) - len(shards)
        log(f"extract {cfg.dataset}: {len(shards)} shards pending ({cfg.what}, base size {cfg.base_size}"
            f"{', multi-scale' if cfg.multi_scale else ''})")
        return shards

    def open(self, cfg: ExtractConfig) -> None:
        from pixart.features.encoders import LatentEncoder, TextEncoder

        if cfg.executor == "ray":  # the encoders load inside the Ray actors
            return
        if cfg.encodes_text:
            self.text = TextEncoder(cfg.t5_model, cfg.max_tokens, cfg.device, cfg.dtype)
        if cfg.what in ("latents", "both"):
            self.latents = LatentEncoder(cfg.vae_model, cfg.device, cfg.dtype)

    def close(self) -> None:
        self.text = self.latents = None

    def ray_pipelines(self, cfg: ExtractConfig, shards: list[Shard]) -> list[RayPipeline]:
        """T5 over caption chunks (no CPU stage), then the VAE over bucket groups decoded on CPU tasks."""
        from pixart.features.encoders import LatentBatchEncoder, TextBatchEncoder, posterior_of, split_features

        def text_accept(shard: TextShard, rows) -> None:
            for row in rows:
                shard.accept(json.loads(row["keys"]), json.loads(row["texts"]), split_features(row))

        def latent_accept(shard: LatentShard, rows) -> None:
            for row in rows:
                keys = json.loads(row["keys"])
                if row["error"]:
                    shard.error(keys[0], str(row["error"]))
                else:
                    shard.accept({"keys": keys, "metas": json.loads(row["metas"])}, *posterior_of(row))

        ray, urls = cfg.ray, {kind: [s.item[1] for s in shards if s.item[0] == kind] for kind in ("text", "latents")}
        return [
            RayPipeline("text-", urls["text"], open=lambda u: TextShard(u, cfg),
                        items=lambda s: [{"keys": json.dumps(k), "texts": json.dumps(t)} for k, t in s.chunks()],
                        accept=text_accept, model=TextBatchEncoder,
                        model_kwargs={"model": cfg.t5_model, "max_tokens": cfg.max_tokens, "device": cfg.device,
                                      "dtype": cfg.dtype},
                        num_gpus=ray.num_gpus_per_replica, replicas=ray.t5_replicas,
                        accelerator_type=ray.t5_accelerator_type),
            RayPipeline("latents-", urls["latents"], open=lambda u: LatentShard(u, cfg),
                        items=lambda s: [{"rows": json.dumps(s.todo, default=str)}] if s.todo else [],
                        accept=latent_accept, read=latent_group_rows, read_kwargs={"cfg": cfg},
                        num_cpus=ray.num_cpus_per_decoder, model=LatentBatchEncoder,
                        model_kwargs={"model": cfg.vae_model, "device": cfg.device, "dtype": cfg.dtype},
                        num_gpus=ray.num_gpus_per_replica, replicas=ray.vae_replicas,
                        accelerator_type=ray.vae_accelerator_type),
        ]

    def run_shard(self, shard: Shard, cfg: ExtractConfig, progress) -> dict[str, Any]:
        kind, url = shard.item
        if kind == "text":
            return extract_text_shard(url, cfg, self.text, progress).to_dict()
        return extract_latent_shard(url, cfg, self.latents, progress).to_dict()

    def finish(self, cfg: ExtractConfig, outcome: StageOutcome, runtime) -> str:
        if cfg.what in ("latents", "both"):
            table, extra = histogram(cfg)
            out = latents_dir(cfg.output_root, cfg.dataset, cfg.base_size, cfg.multi_scale)
            title = f"{cfg.dataset} @ {cfg.base_size}{' multi-scale' if cfg.multi_scale else ''}"
            if not _same_table(join(out, "buckets.parquet"), table):  # an unchanged histogram keeps its files
                with commit_shard(join(out, "buckets.parquet")) as tmp:
                    write_table(table, tmp)
                write_atomic(join(out, "buckets.png"), histogram_png(table, title))
            runtime.table(f"extract-{cfg.dataset}-buckets".lower(),
                          [r for r in table.to_pylist() if r["count"]], f"bucket histogram, {title}")
            used = sum(1 for c in table["count"].to_pylist() if c) if cfg.multi_scale else 1  # square crops: one
            outcome.extra.update(extra, buckets=used)
        kinds: dict[str, int] = {}  # a `both` run counts each image twice (text and latents): say which is which
        for r in outcome.results:
            kind = r["stage"].removeprefix("extract-")
            kinds[kind] = kinds.get(kind, 0) + r["num_ok"]
        outcome.extra["ok_by_kind"] = kinds
        c = outcome.counts()
        if not outcome.ok:
            return failure_message(outcome)
        return f"{feature_counts(kinds)}, {c['num_error']} error rows"


def feature_counts(kinds: dict[str, int]) -> str:
    """'8 text, 8 latents samples' from {"text": 8, "latents": 8}."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), reverse=True)) + " samples" if kinds else \
        "0 samples"


def _same_table(url: str, table) -> bool:
    try:
        return exists(url) and read_table(url).equals(table)
    except PipelineError:  # unreadable: rewrite it
        return False


def histogram(cfg: ExtractConfig):
    heights, widths = [], []
    for url in committed_manifests(cfg.output_root, cfg.dataset):
        t = read_manifest(url, ["height", "width", "status"]).to_pylist()
        heights += [r["height"] for r in t if r["status"] == "ok"]
        widths += [r["width"] for r in t if r["status"] == "ok"]
    return bucket_histogram(heights, widths, cfg.base_size, cfg.bucket_policy if cfg.multi_scale else "clamp")


def estimate_run(cfg: ExtractConfig) -> dict[str, Any]:
    """Bytes per sample and in all for this dataset (what `pixart extract --estimate` prints)."""
    sizes = []
    for url in committed_manifests(cfg.output_root, cfg.dataset):
        sizes += [(r["height"], r["width"]) for r in read_manifest(url, ["height", "width", "status"]).to_pylist()
                  if r["status"] == "ok"]
    tokens = []
    if cfg.encodes_text:
        for url in committed_captions(cfg):
            tokens += [t for t in read_table(url, ["t5_tokens"])["t5_tokens"].to_pylist() if t]
    if cfg.what == "text":
        sizes = []
    return estimate(sizes, tokens, base_size=cfg.base_size, multi_scale=cfg.multi_scale, policy=cfg.bucket_policy,
                    d_model=t5_width(cfg.t5_model), max_tokens=cfg.max_tokens)

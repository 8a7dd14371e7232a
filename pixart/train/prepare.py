"""What runs once on the driver before any training worker starts (and before any GPU time is spent):

1. `check_run`: everything that can be checked without building a model, before anything of the run is written:
   the init exists (a run directory: a committed checkpoint), holds the weights `init_weights` names, with
   readable safetensors headers, and (stage 3) is the previous step of the chain; the features exist, cover every
   committed manifest shard (`check_complete`) and agree with the stage preset (latent size = resolution / 8, T5
   width = the model's caption channels, a class label on every sample for stage 1); every worker gets a full
   batch per epoch; else a clear error;
2. the null caption and the sample prompts are encoded with the run's T5 (pixart/train/conditions.py), whose width must
   be the features' width (the same T5 made them); with executor=ray this step runs in a Ray task instead
   (flows/_ray_train.py), so the driver never loads T5;
3. the resolved config is saved beside the run (runs/<run>/config.yaml).

`flows/train_stage.py` does 1, then (locally) builds and resumes the trainer, and only then writes 2 and 3: a run
that cannot start leaves nothing behind.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pixart.data.index import FeatureShard, feature_shards, incomplete_features, peek
from pixart.data.loader import batches_per_rank
from pixart.features.format import tar_of
from pixart.model_config import PRESETS
from pixart.train.conditions import Conditions
from pixart.train.config import TrainConfig
from pixart.train.weights import check_init
from storage.commit import read_done, write_atomic
from storage.configio import dump_yaml
from storage.errors import ConfigError
from storage.hub import model_identity
from storage.layout import run_dir, shard_of
from storage.manifest import committed_manifests
from storage.parquet import read_rows
from storage.urls import join


def _where(cfg: TrainConfig) -> str:
    data = cfg.data
    return f"features/{data.dataset} at {data.base_size}{'-ms' if data.multi_scale else ''}"


def _shards(cfg: TrainConfig) -> list[FeatureShard]:
    data = cfg.data
    shards = feature_shards(cfg.output_root, data.dataset, data.base_size, data.multi_scale, data.caption_set)
    if not shards:
        raise ConfigError(f"no committed {_where(cfg)} (caption set {data.caption_set}) under {cfg.output_root}: "
                          "run pixart extract first")
    return shards


def recorded_encoders(shards: list[FeatureShard]) -> dict[str, dict[str, str]]:
    """{"t5": {shard: model}, "vae": {shard: model}}: the encoders the feature shards' done markers record."""
    out: dict[str, dict[str, str]] = {"t5": {}, "vae": {}}
    for s in shards:
        for kind, index in (("vae", s.latents), ("t5", s.text)):
            models = ((read_done(index) or {}).get("lineage") or {}).get("models", {}) if index else {}
            if models.get(kind):
                out[kind][s.name] = models[kind]
    return out


def with_recorded_encoders(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with t5_model and vae_model taken from the features' lineage where the config did not set them (and
    every shard records the same one): a run need not be told again which encoders made its features."""
    unset = [k for k, field in (("t5", "t5_model"), ("vae", "vae_model")) if field not in cfg.model_fields_set]
    if not unset:
        return cfg
    try:
        recorded = recorded_encoders(_shards(cfg))
    except ConfigError:
        return cfg  # no features: check_features says so
    found = {k: set(recorded[k].values()) for k in unset}
    update = {f"{k}_model": next(iter(models)) for k, models in found.items() if len(models) == 1}
    return cfg.model_copy(update=update) if update else cfg


def check_encoders(cfg: TrainConfig, shards: list[FeatureShard]) -> None:
    """Refuse features made by another T5 or VAE than the run's: the width alone cannot tell two T5s apart. An
    encoder the config leaves unset is the one the features record (`with_recorded_encoders`), so only a given
    one is compared."""
    recorded = recorded_encoders(shards)
    for kind, field, want in (("t5", "t5_model", cfg.t5_model), ("vae", "vae_model", cfg.vae_model)):
        if (kind == "t5" and cfg.stage == 1) or field not in cfg.model_fields_set:
            continue
        other = {name: model for name, model in recorded[kind].items() if model != want}
        if other:
            name, model = sorted(other.items())[0]
            raise ConfigError(f"{_where(cfg)}: shard {name} was encoded with {kind} {model!r}, but this run's "
                              f"{field} is {want!r}; pass {field}={model} or re-extract the features with {want}")
        _check_same_files(cfg, shards, kind, want)


def _check_same_files(cfg: TrainConfig, shards: list[FeatureShard], kind: str, want: str) -> None:
    """Same name is not the same model: weights saved again at `want` since the features were made would encode
    the run's sample prompts (T5) or decode its grids (VAE) unlike the features. Compared by `model_identity`."""
    recorded = {}
    for s in shards:
        index = s.latents if kind == "vae" else s.text
        lin = ((read_done(index) or {}).get("lineage") or {}) if index else {}
        if lin.get("models", {}).get(kind) == want and lin.get("model_ids", {}).get(kind):
            recorded[s.name] = lin["model_ids"][kind]
    now = model_identity(want) if recorded else None
    other = sorted(name for name, ident in recorded.items() if now and ident != now)
    if other:
        raise ConfigError(f"{_where(cfg)}: shard {other[0]} was encoded with {kind} {want!r} as it was then, and its "
                          f"files have changed since ({len(other)} shard(s)); re-extract the features (pixart "
                          f"extract) or put the {kind} it was made with back")


def check_complete(cfg: TrainConfig) -> None:
    """Refuse features that miss part of the dataset: every committed manifest shard needs its committed latent
    shard, and (stages 2-3) its text shard, as does every latent shard present; else the run would train on part
    of the data without a word (`feature_shards` leaves out what is not committed). A shard whose rows are all
    errors (its images broken, or duplicates of earlier shards' keys) is still committed, so it counts."""
    data = cfg.data
    expected = [shard_of(u) for u in committed_manifests(cfg.output_root, data.dataset)]
    bad = incomplete_features(cfg.output_root, data.dataset, data.base_size, data.multi_scale,
                              data.caption_set if cfg.stage > 1 else None, expected)
    if bad:
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConfigError(f"{_where(cfg)} (caption set {data.caption_set}): not every committed manifest shard "
                          f"({len(expected)}) has its committed features, {len(bad)} missing: {names}. The run "
                          f"would train on part of the data: finish them with pixart extract {data.dataset} (a "
                          "shard being extracted right now: wait for it)")


def _peek_any(shards: list[FeatureShard]) -> dict[str, Any]:
    """Shapes of the first sample that is ok on every side (a shard may hold only error rows)."""
    for shard in shards:
        try:
            return peek(shard)
        except ValueError:
            continue
    raise ConfigError(f"no sample is ok on every side in any of the {len(shards)} feature shards "
                      f"({shards[0].latents} ...): every image or caption failed")


def check_features(cfg: TrainConfig) -> dict[str, Any]:
    data = cfg.data
    shards = _shards(cfg)
    where = _where(cfg)
    check_complete(cfg)
    check_encoders(cfg, shards)
    found = _peek_any(shards)
    channels, h, w = found["latent"]
    arch = PRESETS[cfg.model.preset]
    if channels != 2 * arch["in_channels"]:
        raise ConfigError(f"{where}: latents hold {channels // 2} channels, model.preset {cfg.model.preset} takes "
                          f"{arch['in_channels']}")
    if not data.multi_scale and (h, w) != (cfg.resolution // 8, cfg.resolution // 8):
        raise ConfigError(f"{where}: latents are {h}x{w}, a {cfg.resolution} px stage needs "
                          f"{cfg.resolution // 8}x{cfg.resolution // 8}")
    if cfg.stage > 1:
        want = arch["caption_channels"]
        if found["text_width"] != want:
            raise ConfigError(f"text features of caption set {data.caption_set} are {found['text_width']} wide; "
                              f"model.preset {cfg.model.preset} has caption_channels {want}")
    else:
        check_labels(shards, where)
    return {"shards": len(shards), **found}


def _unlabelled(shard: FeatureShard) -> tuple[int, int, str | None]:
    """(ok samples, samples without a class label, the first such key) of one latent shard. The index's label
    column says it; a row without one (an index older than the column) is looked up in the tar (`.cls` member)."""
    from pixart.data.tar_reads import TarReader
    from storage.wds import sample_members

    rows = [r for r in read_rows(shard.latents) if r["status"] == "ok"]
    missing = [r for r in rows if r.get("label") is None]
    if missing:
        first = missing[0]
        with TarReader() as files:
            members = sample_members(files.read(tar_of(shard.latents),
                                                (first["offset"], first["bytes"])), first["key"])
        if "cls" in members:  # an older index: the label is only in the tar; the loader reads it from there
            return len(rows), 0, None
    return len(rows), len(missing), missing[0]["key"] if missing else None


def check_labels(shards: list[FeatureShard], where: str, threads: int = 16) -> None:
    """Stage 1 trains a class-conditional DiT: every sample needs its class label."""
    with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
        counts = list(pool.map(_unlabelled, shards))
    bad = [(s.name, n, key) for s, (_, n, key) in zip(shards, counts, strict=True) if n]
    if bad:
        total, without = sum(c[0] for c in counts), sum(n for _, n, _ in bad)
        names = ", ".join(name for name, _, _ in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ConfigError(f"{where}: {without} of {total} samples have no class label (e.g. {bad[0][2]} in shard "
                          f"{bad[0][0]}; shards {names}); stage 1 trains a class-conditional DiT on class-labelled "
                          "latents (data.dataset=imagenet)")


def check_run(cfg: TrainConfig) -> dict[str, Any]:
    """Everything about `cfg` that can be checked before a model is built and before anything is written: the
    features (`check_features`), a full batch per epoch for every worker, and the init (`check_init`)."""
    check_init(cfg)  # configs and safetensors headers only: a wrong init is refused before the data is read
    found = check_features(cfg)
    workers = cfg.ray.num_workers if cfg.executor == "ray" else 1
    counts = batches_per_rank(_shards(cfg), cfg.data.batch_size, workers)
    if min(counts) == 0:
        raise ConfigError(f"a rank gets no full batch of {cfg.data.batch_size} per epoch ({found['shards']} shards "
                          f"over {workers} workers: {counts} batches): lower data.batch_size or add shards")
    return found


def prepare_run(cfg: TrainConfig, encode: bool = True) -> dict[str, Any]:
    """Check the run (`check_run`) and save the resolved config; with `encode`, also encode the run's conditions
    here. The Ray executor passes encode=False and runs `prepare_conditions` in a GPU task instead, so the driver
    never loads T5-XXL (19 GB in fp32 on a CPU-only head node)."""
    found = check_run(cfg)
    if encode:
        prepare_conditions(cfg, found["text_width"])
    write_config(cfg)
    return found


def write_config(cfg: TrainConfig) -> None:
    write_atomic(join(run_dir(cfg.output_root, cfg.run), "config.yaml"), dump_yaml(cfg).encode())


def prepare_conditions(cfg: TrainConfig, text_width: int | None, save: bool = True) -> Conditions | None:
    """Encode (or find stored) the null caption and sample prompts with the run's T5, whose width must be the
    features' `text_width`; stored only with `save`. Stage 1 has none."""
    if cfg.stage == 1:
        return None
    cond = Conditions.prepare(cfg, save=save)
    if cond.width != text_width:
        raise ConfigError(f"t5_model {cfg.t5_model!r} is {cond.width} wide but the features are "
                          f"{text_width} wide: set t5_model to the encoder that made the features")
    return cond

"""What runs once on the driver before any training worker starts (and before any GPU time is spent):

1. the features exist and agree with the stage preset (latent size = resolution / 8, T5 width = the model's
   caption channels, class labels for stage 1), else a clear error;
2. the null caption and the sample prompts are encoded with the run's T5 (pixart/conditions.py), whose width must
   be the features' width (the same T5 made them); with executor=ray this step runs in a Ray task instead
   (flows/_ray_train.py), so the driver never loads T5;
3. the resolved config is saved beside the run (runs/<run>/config.yaml).
"""

from __future__ import annotations

from typing import Any

from pixart.conditions import Conditions
from pixart.data import feature_shards, peek
from pixart.models import PRESETS
from pixart.train_config import TrainConfig
from storage.commit import write_atomic
from storage.configio import dump_yaml
from storage.errors import ConfigError
from storage.layout import run_dir
from storage.urls import join


def check_features(cfg: TrainConfig) -> dict[str, Any]:
    data = cfg.data
    shards = feature_shards(cfg.output_root, data.dataset, data.base_size, data.multi_scale, data.caption_set)
    where = f"features/{data.dataset} at {data.base_size}{'-ms' if data.multi_scale else ''}"
    if not shards:
        raise ConfigError(f"no committed {where} (caption set {data.caption_set}) under {cfg.output_root}: "
                          "run pixart extract first")
    found = peek(shards[0])
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
    return {"shards": len(shards), **found}


def prepare_run(cfg: TrainConfig, encode: bool = True) -> dict[str, Any]:
    """Check the features against the preset and save the resolved config; with `encode`, also encode the run's
    conditions here. The Ray executor passes encode=False and runs `prepare_conditions` in a GPU task instead, so the
    driver never loads T5-XXL (19 GB in fp32 on a CPU-only head node)."""
    found = check_features(cfg)
    if encode:
        prepare_conditions(cfg, found["text_width"])
    write_atomic(join(run_dir(cfg.output_root, cfg.run), "config.yaml"), dump_yaml(cfg).encode())
    return found


def prepare_conditions(cfg: TrainConfig, text_width: int | None) -> None:
    """Encode (or find stored) the null caption and sample prompts with the run's T5, whose width must be the
    features' `text_width`. Stage 1 has none."""
    if cfg.stage == 1:
        return
    cond = Conditions.prepare(cfg)
    if cond.width != text_width:
        raise ConfigError(f"t5_model {cfg.t5_model!r} is {cond.width} wide but the features are "
                          f"{text_width} wide: set t5_model to the encoder that made the features")

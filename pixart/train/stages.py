"""What differs between the stages, chosen once per run (`for_stage`): the model built, its forward, and how its
gradients are clipped. Everything else in a step is the same for every stage (pixart/train/trainer.py).

    stage 1      ClassConditional   diffusers' DiT on ImageNet latents; 10 % of the labels dropped to the null class
    stages 2-3   TextConditional    diffusers' PixArt on T5 features; 10 % of the captions dropped to the null caption
                                    (T5("") and its mask, pixart/train/conditions.py); stage 3 multi-scale adds the
                                    micro-conditions (image size, aspect ratio)

Each has `build()` (under the caller's seeded RNG), `forward(model, x_t, t, batch, drop, step)` -> the model's
output [B, 8, h, w] (eps and the variance range) and `clip(model, params, strategy, max_norm)` -> the global gradient
norm before clipping.
"""

from __future__ import annotations

from typing import Any

import torch

from pixart.data.finish import pad_text
from pixart.models import build_dit, build_pixart, dit_forward, init_like_pixart, pixart_forward
from pixart.train.conditions import Conditions
from pixart.train.config import TrainConfig
from pixart.train.sharding import Strategy
from storage.errors import ConfigError

NULL_CLASS = 1000  # DiT's classifier-free-guidance class


class ClassConditional:
    """Stage 1: a class-conditional DiT."""

    caption_channels = None  # no text

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def build(self) -> torch.nn.Module:
        model = build_dit(self.cfg.model, self.cfg.resolution)
        for block in model.transformer_blocks:
            # diffusers' label embedder drops labels itself in train mode, from the global RNG and in every block
            # independently; the step's seeded dropout (same labels for all blocks) replaces it
            block.norm1.emb.class_embedder.dropout_prob = 0.0
        return model

    def forward(self, model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, Any],
                drop: torch.Tensor, step: int) -> torch.Tensor:
        """`batch["cls"]` [B] class labels, those where `drop` [B] replaced by the null class."""
        if "cls" not in batch:
            raise ConfigError(f"step {step + 1}: batch {batch_keys(batch)} has no class labels; stage 1 needs "
                              f"class-labelled latents (features/{self.cfg.data.dataset} has none)")
        labels = torch.where(drop, NULL_CLASS, batch["cls"]).to(x_t.device)
        return dit_forward(model, x_t, t, labels)

    def clip(self, model: torch.nn.Module, params: list[torch.nn.Parameter], strategy: Strategy,
             max_norm: float) -> float:
        """diffusers' DiT keeps one copy of the timestep/label embedder per block where the original shares one;
        their gradients are summed into every copy (the shared parameter's gradient), so the copies stay equal and
        the re-param can use them. The norm counts them once."""
        copies = list(zip(*(b.norm1.emb.parameters() for b in model.transformer_blocks), strict=True))
        skip = {id(p) for group in copies for p in group[1:]}
        for group in copies:
            grads = [p.grad for p in group if p.grad is not None]
            if grads:
                group[0].grad = torch.stack(grads).sum(0)
        norm = strategy.clip_grad_norm([p for p in params if id(p) not in skip], max_norm)
        for group in copies:
            if group[0].grad is not None:
                for p in group[1:]:
                    p.grad = group[0].grad.clone()
        return norm


class TextConditional:
    """Stages 2 and 3: PixArt, from scratch with PixArt's init or from `init`."""

    def __init__(self, cfg: TrainConfig, conditions: Conditions, max_tokens: int) -> None:
        self.cfg, self.conditions, self.max_tokens = cfg, conditions, max_tokens
        self.caption_channels = conditions.width

    def build(self) -> torch.nn.Module:
        model = build_pixart(self.cfg.model, self.cfg.resolution, caption_channels=self.caption_channels)
        init_like_pixart(model)
        return model

    def forward(self, model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, Any],
                drop: torch.Tensor, step: int) -> torch.Tensor:
        """`batch["text"]` [B, 120, C] and `batch["mask"]` [B, 120] (or, with data.finish on the device, the valid
        rows `text_rows` and `n_tokens`, padded here), captions where `drop` [B] replaced by the null caption;
        multi-scale: `img_hw` [B, 2] and `aspect_ratio` [B]."""
        dev = x_t.device
        if "text" in batch:
            text, mask = batch["text"], batch["mask"]
        else:  # padded here, on the training device (data.finish)
            text, mask = pad_text(batch["text_rows"].to(dev, non_blocking=True), batch["n_tokens"], self.max_tokens)
        text, mask = self.conditions.drop(text, mask, drop)
        micro = {}
        if self.cfg.model.multi_scale:
            micro = {"img_hw": batch["img_hw"].to(dev), "aspect_ratio": batch["aspect_ratio"][:, None].to(dev)}
        text = text.to(dev, non_blocking=True).float()  # fp16 over the bus; the model casts it (autocast)
        return pixart_forward(model, x_t, t, text, mask.to(dev), **micro)

    def clip(self, model: torch.nn.Module, params: list[torch.nn.Parameter], strategy: Strategy,
             max_norm: float) -> float:
        return strategy.clip_grad_norm(params, max_norm)


def for_stage(cfg: TrainConfig, conditions: Conditions | None, max_tokens: int) -> ClassConditional | TextConditional:
    """Stage 1's DiT, or stages 2-3's PixArt (which need the run's conditions)."""
    if cfg.stage == 1:
        return ClassConditional(cfg)
    return TextConditional(cfg, conditions, max_tokens)


def batch_keys(batch: dict[str, Any], most: int = 8) -> str:
    """The batch's sample keys (and shards, when it carries them) for a message."""
    keys = [str(k) for k in batch.get("keys", [])]
    text = ", ".join(keys[:most]) + (f" (+{len(keys) - most} more)" if len(keys) > most else "") if keys else "?"
    shards = batch.get("shards")
    if shards:
        text += f" from shards {', '.join(sorted({str(x) for x in shards}))}"
    return f"[{text}]"

"""What to build, without building it: the architecture presets and `ModelConfig`, importable without torch (the
training config and `pixart train --help` read them). The builders and loaders are in `pixart/models.py`, whose
docstring explains each preset key."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from storage.configio import StrictModel

_COMMON = {"in_channels": 4, "out_channels": 8, "patch_size": 2, "norm_elementwise_affine": False, "norm_eps": 1e-6,
           "attention_bias": True, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000}
_PIXART = {**_COMMON, "norm_type": "ada_norm_single"}
_DIT = {**_COMMON, "norm_type": "ada_norm_zero"}

# Tiny shapes are mutually compatible (dit-tiny re-params into pixart-tiny); hidden 24 is divisible by 3, which the
# multi-scale size/aspect embedders need (2 x dim/3 + dim/3 = dim).
PRESETS: dict[str, dict[str, Any]] = {
    "pixart-xl-2": {**_PIXART, "num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72,
                    "cross_attention_dim": 1152, "caption_channels": 4096},
    "dit-xl-2": {**_DIT, "num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72},
    # CPU benchmarks: PixArt's shape family at a width a 2-core machine trains at a few steps/s, T5-XXL features
    "pixart-small": {**_PIXART, "num_layers": 4, "num_attention_heads": 6, "attention_head_dim": 32,
                     "cross_attention_dim": 192, "caption_channels": 4096},
    "pixart-tiny": {**_PIXART, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 12,
                    "cross_attention_dim": 24, "caption_channels": 32},
    "dit-tiny": {**_DIT, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 12},
}


class ModelConfig(StrictModel):
    """Which architecture to build and how; the resolution comes from the training stage."""

    preset: str = Field(description=f"One of {sorted(PRESETS)}.")
    gradient_checkpointing: bool = Field(False, description="Recompute each block in backward (all α configs).")
    interpolation_scale: float | None = Field(None, gt=0, description="Positional-embedding scale; None: "
                                              "pe_interpolation(resolution).")
    multi_scale: bool = Field(False, description="Add the resolution / aspect-ratio micro-condition embedders "
                              "(PixArtMS, stage 3 at 1024).")
    compile: bool = Field(False, description="torch.compile the training forward (inductor; the first steps "
                          "compile). Checkpoints and EMA keep the plain module, so nothing else changes.")

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown model preset {v!r}; known: {', '.join(sorted(PRESETS))}")
        return v

"""FSDP for `ray.strategy=fsdp`: the transformer's blocks, then the whole model, sharded across the ranks with FSDP2
(`torch.distributed.fsdp.fully_shard`), so each rank holds 1/world of the weights, gradients and AdamW state.

Checkpoints keep the layout of every other run (a diffusers directory per model, a full optimizer state): the
full state is gathered from all ranks (`full_state`, a collective every rank must call) and rank 0 writes it through
a plain copy of the model (`plain_copy`). Resuming hands each rank the full state read from the checkpoint, and
torch.distributed.checkpoint keeps the rank's shard (`load_full_state`). The optimizer state is stored by parameter
name (torch.distributed.checkpoint's full layout), not by index as under DDP, so a run resumes only under the
strategy that wrote it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0 only
SCATTER = StateDictOptions(full_state_dict=True)  # every rank passes the full state; each keeps its shard


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """Shard `model` in place (each transformer block, then the rest) and return it. Block 0 stays gathered from its
    forward to the backward: diffusers' DiT reuses block 0's timestep/class embedder in its final layer, after the
    blocks have run."""
    for i, block in enumerate(model.transformer_blocks):
        fully_shard(block, reshard_after_forward=i != 0)
    fully_shard(model)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights on rank 0 (CPU), {} on the other ranks. Every rank must call it."""
    return get_model_state_dict(model, options=GATHER)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state by parameter name on rank 0, {} elsewhere. Every rank must call it."""
    return get_optimizer_state_dict(model, optimizer, options=GATHER)


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every rank passes the same full weights; each keeps its own shard."""
    set_model_state_dict(model, state, options=SCATTER)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=SCATTER)


def plain_copy(cls: type, config: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded `cls` model (a diffusers class, built from its config) holding `state`: what rank 0 saves with
    `save_pretrained` and samples with."""
    model = cls.from_config(config)
    model.load_state_dict(state, strict=True)
    return model

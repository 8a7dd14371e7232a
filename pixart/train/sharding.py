"""How the model is spread over the ranks, behind one interface chosen once per run (torchtitan's `parallelize`):

    strategy = Replicated()                  # one process; or Replicated(wrap=ddp) under Ray Train (DDP)
    strategy = FSDP()                        # ray.strategy=fsdp: FSDP2 (`fully_shard`), 1/world of everything per rank
    forward_model = strategy.parallelize(model, ema)   # what the step calls
    norm = strategy.clip_grad_norm(params, max_norm)   # the global norm, also over shards
    whole = strategy.full_model(model, keep=rank == 0) # every rank calls it; the unsharded model where kept
    state = strategy.full_optimizer_state(model, optimizer)
    strategy.load_model(model, directory); strategy.load_optimizer(model, optimizer, directory, device)

`Replicated` keeps a whole model on every rank (a single process, or DDP replicas that stay identical); `FSDP` shards
each transformer block, then the whole model, so each rank holds 1/world of the weights, gradients and AdamW state.

Checkpoints keep one layout under both (a diffusers directory per model, a full optimizer state): under FSDP the
full state is gathered from all ranks (a collective every rank must call) and rank 0 writes it through a plain copy
of the model; resuming hands each rank the full state read from the checkpoint, and torch.distributed.checkpoint
keeps the rank's shard. The FSDP optimizer state is stored by parameter name (torch.distributed.checkpoint's full
layout), not by index as under DDP, so a run resumes only under the strategy that wrote it (`name`, recorded in
trainer.json).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from pixart.train.checkpoint import read_optimizer
from pixart.train.weights import load_weights

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0 only
SCATTER = StateDictOptions(full_state_dict=True)  # every rank passes the full state; each keeps its shard


class Strategy:
    """The interface the trainer sees; `name` is recorded in trainer.json (a run resumes only under its own)."""

    name = ""

    def parallelize(self, model: torch.nn.Module, ema: torch.nn.Module | None) -> torch.nn.Module:
        """Spread `model` (and the EMA) over the ranks; returns the module the step calls."""
        raise NotImplementedError

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip the gradients of `params` to a global norm of `max_norm`; returns the norm before clipping."""
        raise NotImplementedError

    def full_model(self, model: torch.nn.Module, keep: bool) -> torch.nn.Module | None:
        """The whole, unsharded model where `keep` (rank 0), None elsewhere. Every rank must call it."""
        raise NotImplementedError

    def full_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state to save (rank 0's is written). Every rank must call it."""
        raise NotImplementedError

    def load_model(self, model: torch.nn.Module, directory: Path) -> None:
        """Load a diffusers model directory's weights (strict) into `model`, on every rank."""
        raise NotImplementedError

    def load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path,
                       device: torch.device) -> None:
        """Load the checkpoint's `optimizer.pt` (read with weights_only=True) into `optimizer`, on every rank."""
        raise NotImplementedError


class Replicated(Strategy):
    """Every rank holds the whole model: one process, or DDP (`wrap`, e.g. Ray Train's `prepare_model`), whose
    replicas stay identical, so rank 0's copy is the model."""

    name = "ddp"

    def __init__(self, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> None:
        self.wrap = wrap

    def parallelize(self, model: torch.nn.Module, ema: torch.nn.Module | None) -> torch.nn.Module:
        """The module the step calls (`model` itself, or its DDP wrapper); the EMA stays a plain local copy."""
        return self.wrap(model) if self.wrap is not None else model

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def full_model(self, model: torch.nn.Module, keep: bool) -> torch.nn.Module | None:
        return model if keep else None

    def full_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_model(self, model: torch.nn.Module, directory: Path) -> None:
        load_weights(model, directory, strict=True)

    def load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path,
                       device: torch.device) -> None:
        optimizer.load_state_dict(read_optimizer(directory, device))


class FSDP(Strategy):
    """FSDP2 over the ranks of an initialised process group: each transformer block, then the rest, sharded in
    place (the model object becomes an FSDP subclass of itself; the EMA gets the same layout, so its update runs
    shard by shard)."""

    name = "fsdp"

    def __init__(self) -> None:
        self.model_cls: type | None = None  # the diffusers class and config, for plain copies of the full state
        self.config: Any = None

    def parallelize(self, model: torch.nn.Module, ema: torch.nn.Module | None) -> torch.nn.Module:
        self.model_cls, self.config = type(model), model.config  # before sharding, which swaps in a subclass
        shard(model)
        if ema is not None:
            shard(ema)
        return model

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm).full_tensor())  # a DTensor: reduced over shards

    def full_model(self, model: torch.nn.Module, keep: bool) -> torch.nn.Module | None:
        """Gathers the shards (every rank must call it); on CPU, a plain model where `keep`, else None."""
        state = get_model_state_dict(model, options=GATHER)  # {} on ranks other than 0
        return plain_copy(self.model_cls, self.config, state) if keep else None

    def full_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """By parameter name on rank 0, {} elsewhere. Every rank must call it."""
        return get_optimizer_state_dict(model, optimizer, options=GATHER)

    def load_model(self, model: torch.nn.Module, directory: Path) -> None:
        """Every rank reads the full weights; each keeps its shard."""
        plain = self.model_cls.from_config(self.config)
        load_weights(plain, directory, strict=True)
        set_model_state_dict(model, plain.state_dict(), options=SCATTER)

    def load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path,
                       device: torch.device) -> None:
        set_optimizer_state_dict(model, optimizer, read_optimizer(directory, "cpu"), options=SCATTER)



def shard(model: torch.nn.Module) -> torch.nn.Module:
    """Shard `model` in place (each transformer block, then the rest) and return it. Block 0 stays gathered from its
    forward to the backward: diffusers' DiT reuses block 0's timestep/class embedder in its final layer, after the
    blocks have run."""
    for i, block in enumerate(model.transformer_blocks):
        fully_shard(block, reshard_after_forward=i != 0)
    fully_shard(model)
    return model


def plain_copy(cls: type, config: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded `cls` model (a diffusers class, built from its config) holding `state`: what rank 0 saves with
    `save_pretrained` and samples with."""
    model = cls.from_config(config)
    model.load_state_dict(state, strict=True)
    return model

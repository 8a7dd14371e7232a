"""The trainer's state, one provider per piece: what `checkpoint.save_state` writes and `checkpoint.load_state` reads
back, walked in this order (torchtitan's checkpointer walks its `state_dict` providers the same way):

    provider    writes                                                     a resume
    rng         trainer.json "rng": the data.seed every step's generator   refuses another data.seed
                comes from (nothing else to store: see `step_generator`)
    progress    step, world_size, stage, stage_step, gpu_hours,            refuses another strategy; sets the step
                samples_seen, config_hash, strategy, init                  and the counters
    loader      epoch, steps_per_epoch (epoch 0's), loader (the trained    refuses another world size or batch count
                step's position, never the reader's, which runs ahead)
    features    features: the content id of every feature shard read       refuses changed, added or removed shards
                ({"latents-<shard>": id, "text-<shard>": id})
    model       transformer/ (diffusers, safetensors)                      loads it, strict
    ema         ema/ (when the run keeps an EMA)                           loads it (transformer/ if absent)
    optimizer   optimizer.pt; lr, lr_scheduler, optimizer (the             AdamW and the warm-up schedule
                hyperparameters in use), changes
    config      config.yaml (the resolved config)                          -

Every provider is a thin view over a `Trainer` (pixart/train/trainer.py), built when a checkpoint is saved or read.
Under FSDP the weights and the optimizer state are gathered on every rank and written by rank 0 (the strategy's
`full_model` / `full_optimizer_state`, pixart/train/sharding.py).
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pixart.train import checkpoint
from pixart.train.checkpoint import StateProvider
from storage.configio import config_hash, dump_yaml
from storage.errors import ConfigError, PipelineError

if TYPE_CHECKING:
    from pixart.train.trainer import Trainer


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Everything random in one step (t, noise, dropout) comes from this generator: a function of (seed, step,
    rank), so a resumed run draws what an uninterrupted one would, with no RNG state to store."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


class EpochSteps:
    """The steps of each epoch: the fewest batches any rank's loader yields in it (DDP needs equal steps on every
    rank). Epoch 0 has the fewest; a later one adds the batches that carried bucket leftovers complete, and they are
    trained, not cut off at epoch 0's count. A pure function of the indexes, so a step's (epoch, index) is too."""

    def __init__(self, counts: list[list[list[int]]], batch_size: int) -> None:
        self.counts, self.batch_size = counts, batch_size  # per rank, per stream, per bucket (stream_bucket_counts)
        self.starts = [0]  # the first step of epochs 0, 1, ..., extended on demand
        self._lock = threading.Lock()  # the prefetch thread and a checkpoint save both extend it

    def __call__(self, epoch: int) -> int:
        from pixart.data.loader import batches_in_epoch

        return min(sum(batches_in_epoch(s, self.batch_size, epoch) for s in rank) for rank in self.counts)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, steps of it done) after `step` trained steps."""
        if self(0) == 0:
            raise ValueError("no full batch per epoch on some rank")
        with self._lock:
            while self.starts[-1] <= step:
                self.starts.append(self.starts[-1] + self(len(self.starts) - 1))
            epoch = bisect.bisect_right(self.starts, step) - 1
            return epoch, step - self.starts[epoch]


def loader_state(step: int, epoch_steps: EpochSteps, seed: int) -> dict[str, Any]:
    """The loader's position after `step` trained steps: a function of the step alone."""
    epoch, index = epoch_steps.position(step)
    return {"epoch": epoch, "seed": seed, "consumed": {0: index}}


def state_providers(trainer: Trainer) -> dict[str, StateProvider]:
    """The trainer's state providers, in the order they are checked, written and read."""
    found: dict[str, StateProvider] = {"rng": Rng(trainer), "progress": Progress(trainer),
                                       "loader": LoaderPosition(trainer), "features": FeatureIds(trainer),
                                       "model": Weights(trainer, trainer.model, "transformer")}
    if trainer.ema is not None:
        found["ema"] = Weights(trainer, trainer.ema, "ema", fallback="transformer")
    found["optimizer"] = Optimizer(trainer)
    found["config"] = ConfigFile(trainer)
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Counters and positions: trainer.json only
# ---------------------------------------------------------------------------------------------------------------------


class Rng(StateProvider):
    def __init__(self, trainer: Trainer) -> None:
        self.seed = trainer.cfg.data.seed

    def write(self, gathered: Any, directory: Path) -> dict[str, Any]:
        return {"rng": {"seed": self.seed, "step_generator": "blake2b(seed/step/rank)"}}

    def check(self, state: dict[str, Any], url: str) -> None:
        seed = state.get("rng", state.get("loader", {})).get("seed", self.seed)  # older checkpoints: the loader's
        if seed != self.seed:
            raise ConfigError(f"{url} was trained with data.seed={seed}, this run has {self.seed}: the seed fixes "
                              "the data order and every step's randomness, so a resume cannot change it. Resume "
                              f"with data.seed={seed}, or start a new run from this checkpoint's weights (init=...)")


class Progress(StateProvider):
    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer

    def write(self, gathered: Any, directory: Path) -> dict[str, Any]:
        t = self.t
        return {"step": t.step, "world_size": t.world_size, "stage": t.cfg.stage, "stage_step": t.cfg.stage_step,
                "gpu_hours": t.gpu_hours,
                "samples_seen": t.samples_seen, "config_hash": config_hash(t.cfg), "strategy": t.strategy.name,
                "init": t.init_record}

    def check(self, state: dict[str, Any], url: str) -> None:
        used, ours = state.get("strategy", "ddp"), self.t.strategy.name
        if used != ours:
            raise PipelineError(f"{url} was written under {used}, this run uses {ours}: their optimizer states "
                                "differ in layout; resume with the same ray.strategy, or start a new run from this "
                                "checkpoint's weights (init=...)")

    def read(self, directory: Path, state: dict[str, Any]) -> None:
        t = self.t
        t.step, t.gpu_hours, t.samples_seen = int(state["step"]), float(state["gpu_hours"]), int(state["samples_seen"])
        t.init_record = state.get("init", t.init_record)  # what the run really started from


class LoaderPosition(StateProvider):
    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer

    def write(self, gathered: Any, directory: Path) -> dict[str, Any]:
        t = self.t
        loader = loader_state(t.step, t.epoch_steps, t.cfg.data.seed)
        return {"epoch": loader["epoch"], "steps_per_epoch": t.steps_per_epoch, "epoch_steps": "per-epoch",
                "loader": loader}

    def check(self, state: dict[str, Any], url: str) -> None:
        t = self.t
        if state["world_size"] != t.world_size or state["steps_per_epoch"] != t.steps_per_epoch:
            raise PipelineError(f"{url} was written by {state['world_size']} workers with {state['steps_per_epoch']} "
                                f"steps per epoch; this run has {t.world_size} and {t.steps_per_epoch}. "
                                "Resume with the same ray.num_workers and data.batch_size, or start a new run.")
        step = int(state["step"])
        if "epoch_steps" not in state and t.epoch_steps.position(step) != divmod(step, t.steps_per_epoch):
            raise PipelineError(f"{url} was written when every epoch ran epoch 0's {t.steps_per_epoch} steps; here "
                                f"later epochs run all their batches, so step {step} is another data position. "
                                "Start a new run (or resume with the version that wrote it).")


class FeatureIds(StateProvider):
    """The content ids of the feature shards the run reads (`pixart.data.index.feature_ids`): a resume on other
    features (a shard re-extracted, added or gone) would silently train on other data than its steps so far and
    break the loader's position, so it is refused."""

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer

    def write(self, gathered: Any, directory: Path) -> dict[str, Any]:
        return {"features": dict(self.t.feature_ids)}

    def check(self, state: dict[str, Any], url: str) -> None:
        was, now = state.get("features"), self.t.feature_ids
        if was is None:
            return  # a checkpoint written before the ids were recorded
        diff = [f"{name} {'changed' if name in was and name in now else 'added' if name in now else 'gone'}"
                for name in sorted(set(was) | set(now)) if was.get(name) != now.get(name)]
        if diff:
            more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
            raise ConfigError(f"{url} was trained on other features than {self.t.cfg.data.dataset}'s now: "
                              f"{', '.join(diff[:5])}{more} (content ids differ from the checkpoint's trainer.json). "
                              "A run cannot continue on changed data: start a new run (another run=...) from this "
                              "checkpoint's weights (init=...)")


# ---------------------------------------------------------------------------------------------------------------------
# Files: the weights, the optimizer, the config
# ---------------------------------------------------------------------------------------------------------------------


class Weights(StateProvider):
    """A model as a diffusers directory (`name`/); read from `fallback`/ when a checkpoint has no `name`/."""

    def __init__(self, trainer: Trainer, model: torch.nn.Module, name: str, fallback: str | None = None) -> None:
        self.t, self.model, self.name, self.fallback = trainer, model, name, fallback

    def gather(self) -> torch.nn.Module | None:
        return self.t.strategy.full_model(self.model, keep=self.t.rank == 0)

    def write(self, gathered: torch.nn.Module, directory: Path) -> dict[str, Any]:
        gathered.save_pretrained(directory / self.name, safe_serialization=True)
        return {}

    def read(self, directory: Path, state: dict[str, Any]) -> None:
        source = directory / self.name
        if not source.exists() and self.fallback is not None:
            source = directory / self.fallback
        self.t.strategy.load_model(self.model, source)


class Optimizer(StateProvider):
    """AdamW's state (optimizer.pt) and the warm-up schedule's; the hyperparameters in use and their changes."""

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer

    def gather(self) -> dict[str, Any]:
        return self.t.strategy.full_optimizer_state(self.t.model, self.t.optimizer)

    def write(self, gathered: dict[str, Any], directory: Path) -> dict[str, Any]:
        checkpoint.save_optimizer(gathered, directory)
        scheduler = self.t.scheduler
        return {"lr": scheduler.base_lrs[0], "lr_scheduler": scheduler.state_dict(),
                "optimizer": self.hyperparameters(), "changes": list(self.t.changes)}

    def read(self, directory: Path, state: dict[str, Any]) -> None:
        t = self.t
        t.strategy.load_optimizer(t.model, t.optimizer, directory, t.device)
        t.scheduler.load_state_dict(state["lr_scheduler"])
        t.changes = list(state.get("changes", []))

    def hyperparameters(self) -> dict[str, Any]:
        """The optimizer's settings in use (lr: the peak, after lr_scaling), from the optimizer itself."""
        group, optim = self.t.optimizer.param_groups[0], self.t.cfg.optim
        return {"lr": self.t.scheduler.base_lrs[0], "betas": list(group["betas"]), "eps": group["eps"],
                "weight_decay": group["weight_decay"], "warmup_steps": optim.warmup_steps,
                "grad_clip": optim.grad_clip, "ema_decay": optim.ema_decay}

    def use_config(self, state: dict[str, Any], url: str, log: Callable[[str], None] | None) -> None:
        """The optimizer and scheduler states just read carry the checkpoint's lr, betas, eps and weight decay;
        set the config's instead, and record (and say) each one that differs from what the checkpoint used."""
        t, optim = self.t, self.t.cfg.optim
        used = dict(state.get("optimizer") or {})
        used.update({k: v for k, v in self.hyperparameters().items()
                     if k in ("lr", "betas", "eps", "weight_decay")})  # what the loaded states really hold
        for g in t.optimizer.param_groups:
            g.update(betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay, initial_lr=t.lr)
        t.scheduler.base_lrs = [t.lr] * len(t.optimizer.param_groups)
        factor = t.scheduler.lr_lambdas[0](t.scheduler.last_epoch)
        for g in t.optimizer.param_groups:
            g["lr"] = t.lr * factor
        t.scheduler._last_lr = [g["lr"] for g in t.optimizer.param_groups]
        for key, value in self.hyperparameters().items():
            if key in used and used[key] != value:
                t.changes.append({"step": t.step, "key": f"optim.{key}", "was": used[key], "now": value})
                if log is not None:
                    note = " (the peak lr after lr_scaling)" if key == "lr" and optim.lr_scaling != "none" else ""
                    log(f"{url.rsplit('/', 1)[-1]} used optim.{key}={used[key]}; this run has {value}{note}: "
                        f"applied from step {t.step + 1} on, and recorded in the next checkpoints")


class ConfigFile(StateProvider):
    def __init__(self, trainer: Trainer) -> None:
        self.cfg = trainer.cfg

    def write(self, gathered: Any, directory: Path) -> dict[str, Any]:
        (directory / "config.yaml").write_text(dump_yaml(self.cfg))
        return {}

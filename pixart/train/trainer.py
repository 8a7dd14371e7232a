"""The training step and loop of every stage, as a library: no Prefect, no Ray (flows/_ray_train.py wraps it).

    prepare_run(cfg)                          # once, on the driver: checks features, encodes the null caption
    trainer = Trainer(cfg, rank, world_size)  # model (init or re-param), AdamW, warm-up, EMA, loader
    trainer.resume(log=print)                 # from the run's latest checkpoint, if there is one; else says
                                              # which weights of cfg.init (init_weights) started it
    for metrics in trainer.fit(): ...         # steps up to schedule.max_steps; checkpoints, samples, metrics

The pieces it is assembled from, each chosen once: the stage (pixart/train/stages.py: stage 1's class-conditional
DiT or stages 2-3's text-conditional PixArt: the model, its forward, its clipping), the parallelism
(pixart/train/sharding.py: one process, DDP or FSDP behind one `Strategy`) and the checkpointed state
(pixart/train/state.py: providers for the model, EMA, optimizer, data position, RNG and step, walked by
pixart/train/checkpoint.py).

One step (`train_step`, top to bottom): latents and padded T5 from the loader (with data.finish=device the posterior
is sampled and the T5 rows padded here, on the training device), t ~ U{0..999}, noise, q_sample, the stage's
forward, the IDDPM hybrid loss (pixart/train/diffusion.py; loss.decoder_cdf picks the t = 0 term's normal CDF),
backward, clip at 0.01, AdamW, warm-up schedule, EMA. 10 % of the labels (stage 1) or captions (stages 2-3) are
dropped to the null class or caption, so guidance at sampling matches training.

Determinism. Everything random in a step (t, noise, dropout) comes from a generator seeded by (seed, step, rank),
and the loader's batch for (step, rank) is fixed by its plan, so a run stopped and resumed from a checkpoint
computes exactly the steps an uninterrupted run would. Every rank runs the same number of steps in an epoch (the
smallest rank's batch count in it, `state.EpochSteps`: later epochs add the batches carried leftovers complete),
which DDP needs and which makes the loader position a function of the step alone: checkpoints store the position
of the trained step (`loader_state`), never the reader's, which runs ahead.

Resume. data.seed must be the checkpoint's (it fixes the data order and every step's randomness), and so must the
feature shards (their content ids are in trainer.json). The optimizer's hyperparameters (optim.lr, betas, eps,
weight_decay; warmup_steps, grad_clip and ema_decay are read from the config anyway) are the config's: a changed
value is applied from the resumed step on, said through `resume(log=...)` and recorded in the checkpoints'
trainer.json ("optimizer": what is used, "changes": when each changed).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pixart.data.finish import sample_posterior
from pixart.data.index import feature_ids, feature_shards, shard_entries
from pixart.data.loader import BucketedLoader, stream_bucket_counts
from pixart.data.prefetch import Prefetch
from pixart.features.encoders import resolve_device
from pixart.train import checkpoint
from pixart.train.conditions import Conditions
from pixart.train.config import TrainConfig
from pixart.train.diffusion import IDDPM
from pixart.train.sharding import Replicated, Strategy
from pixart.train.stages import batch_keys, for_stage
from pixart.train.state import EpochSteps, Optimizer, loader_state, state_providers, step_generator
from pixart.train.weights import InitSource, load_init
from storage.errors import PipelineError


class NonFiniteLossError(PipelineError):
    """A NaN or inf loss: the step is not applied and the last checkpoint stays the latest."""


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1, *, device: torch.device | None = None,
                 strategy: Strategy | None = None,
                 all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 conditions: Conditions | None = None) -> None:
        """`strategy`: how the model is spread over the ranks (pixart/train/sharding.py; default: one process).
        `conditions`: the run's null caption and sample prompts when already in memory (a run being started
        writes nothing before its trainer is built); else read from runs/<run>/conditions.safetensors."""
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = device or resolve_device(cfg.device)
        self.autocast = self.device.type == "cuda" and cfg.dtype != "float32"
        self.all_reduce_mean = all_reduce_mean or (lambda x: x)
        self.strategy = strategy or Replicated()
        data = cfg.data
        # data: every rank gets the same number of full batches per epoch
        shards = feature_shards(cfg.output_root, data.dataset, data.base_size, data.multi_scale, data.caption_set)
        if not shards:
            raise PipelineError(f"no committed feature shards for {data.dataset} at {data.base_size}"
                                f"{'-ms' if data.multi_scale else ''} (caption set {data.caption_set}) under "
                                f"{cfg.output_root}: run pixart extract first")
        self.feature_ids = feature_ids(shards)  # recorded in checkpoints: a resume on changed features is refused
        on_device = data.finish == "device" or (data.finish == "auto" and self.device.type == "cuda")
        self.loader = BucketedLoader(shards, data.batch_size, seed=data.seed, rank=rank, world_size=world_size,
                                     max_tokens=data.max_tokens, sample_posterior=not on_device,
                                     pad_text=not on_device)
        self.epoch_steps = EpochSteps(stream_bucket_counts(shards, world_size), data.batch_size)
        self.steps_per_epoch = self.epoch_steps(0)  # the fewest of any epoch; what a resume checks
        if self.steps_per_epoch == 0:
            raise PipelineError(f"a rank gets no full batch of {data.batch_size} per epoch ({len(shards)} shards "
                                f"over {world_size} workers): lower data.batch_size or add shards")
        # the stage: stages 2-3 condition on the run's null caption
        self.conditions = (conditions or Conditions.load(cfg)) if cfg.stage > 1 else None
        if cfg.stage > 1 and self.conditions is None:
            raise PipelineError(f"run {cfg.run}: no null caption / sample prompts encoded by {cfg.t5_model} "
                                "(runs/<run>/conditions.safetensors); prepare_run(cfg) writes them before training")
        self.stage = for_stage(cfg, self.conditions, self.loader.max_tokens)
        # model and EMA, then spread over the ranks (and compiled: checkpoints keep the plain module's names)
        self.init_source: InitSource | None = None  # where cfg.init's weights came from
        self.init_record: dict[str, Any] | None = None  # the same for trainer.json (a resume keeps the checkpoint's)
        self.model = self._init_model().to(self.device).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval() if cfg.optim.ema_decay else None
        self.forward_model = self.strategy.parallelize(self.model, self.ema)
        if cfg.model.compile:
            self.forward_model = torch.compile(self.forward_model)
        # optimizer, warm-up schedule, loss
        self.lr = cfg.optim.lr * (math.sqrt(data.batch_size * world_size / 256) if cfg.optim.lr_scaling == "sqrt"
                                  else 1.0)
        self.optimizer = torch.optim.AdamW(self.forward_model.parameters(), lr=self.lr, betas=cfg.optim.betas,
                                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                                           fused=self.device.type == "cuda")
        from diffusers.optimization import get_constant_schedule_with_warmup

        self.scheduler = get_constant_schedule_with_warmup(self.optimizer, cfg.optim.warmup_steps)
        self.diffusion = IDDPM(decoder_cdf=cfg.loss.decoder_cdf)
        self.step, self.gpu_hours, self.samples_seen = 0, 0.0, 0
        self.changes: list[dict[str, Any]] = []  # hyperparameters changed at a resume: {step, key, was, now}

    def _init_model(self) -> torch.nn.Module:
        """Built under a generator seeded by data.seed, so a fresh run has the same initial weights every time
        and on every rank; then cfg.init's weights, if any."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.data.seed)
            model = self.stage.build()
            if self.cfg.init:
                self.init_source = load_init(model, self.cfg, caption_channels=self.stage.caption_channels)
                self.init_record = self.init_source.record(self.cfg.init)
            return model

    def init_note(self) -> str | None:
        """What the run's log says about the weights it started from: which (model or EMA) and the files."""
        if self.init_source is None:
            return None
        files = self.init_source.files()
        return f"{self.init_source.note}{': ' + ', '.join(files) if files else ''}"

    # -- data ---------------------------------------------------------------------------------------------------------

    def batches(self) -> Iterator[dict[str, Any]]:
        """The loader's batches from the current step on, epoch after epoch (equal length on every rank), read
        ahead in a background thread while the step runs."""
        depth = self.cfg.data.prefetch if self.cfg.data.prefetch is not None else (
            2 if self.device.type == "cuda" else 0)
        if depth == 0:
            yield from self._batches()
            return
        ahead = Prefetch(self._batches(), depth=depth, pin=self.device.type == "cuda")
        try:
            yield from ahead
        finally:
            ahead.close()

    def _batches(self) -> Iterator[dict[str, Any]]:
        position = self.step  # its own count: it runs ahead of self.step in the prefetch thread
        while True:
            self.loader.load_state_dict(loader_state(position, self.epoch_steps, self.cfg.data.seed))
            epoch = self.loader.epoch
            steps = self.epoch_steps(epoch)
            for batch in self.loader:
                position += 1
                yield batch
                if self.loader.consumed[0] >= steps:
                    break
            else:  # ran dry before its step count: retrying the same epoch would spin, and the ranks would part
                raise PipelineError(f"rank {self.rank}: epoch {epoch} gave {self.loader.consumed.get(0, 0)} batches, "
                                    f"fewer than the {steps} steps of that epoch counted at the start; "
                                    "did the feature shards change under the run?")

    # -- one step -----------------------------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        cfg, dev = self.cfg, self.device
        start = time.perf_counter()
        # latents x0 [B, 4, h, w]
        if "latents" in batch:
            x0 = batch["latents"].to(dev, non_blocking=True)
        else:  # sampled here, on the training device (data.finish)
            x0 = sample_posterior(batch["posterior"].to(dev, non_blocking=True), batch["noise_seed"],
                                  self.loader.scaling_factor)
        n = x0.shape[0]
        # the step's randomness: timesteps, noise, condition dropout
        gen = step_generator(cfg.data.seed, self.step, self.rank)
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(n, generator=gen) < cfg.caption_dropout
        any_t0 = bool((t == 0).any())
        t, noise = t.to(dev), noise.to(dev)
        # noise the latents, predict, loss
        x_t = self.diffusion.q_sample(x0, t, noise)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.stage.forward(self.forward_model, x_t, t, batch, drop, self.step)
        losses = self.diffusion.training_losses(out.float(), x0, x_t, t, noise, any_t0=any_t0)
        loss = losses["loss"].mean()
        if not torch.isfinite(loss.detach()).item():
            self._refuse_non_finite(loss, losses, batch)
        # backward, clip, AdamW, warm-up, EMA
        loss.backward()
        grad_norm = self.stage.clip(self.model, list(self.forward_model.parameters()), self.strategy,
                                    cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()),
                                     1 - cfg.optim.ema_decay)
        # accounting and metrics (the losses averaged over the ranks)
        self.step += 1
        self.samples_seen += n * self.world_size
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        if dev.type == "cuda":
            self.gpu_hours += seconds * self.world_size / 3600
        reduced = self.all_reduce_mean(torch.stack([loss.detach(), losses["mse"].mean().detach(),
                                                    losses["vb"].mean().detach()]).float()).tolist()
        return {"step": self.step, "loss": reduced[0], "mse": reduced[1], "vb": reduced[2], "grad_norm": grad_norm,
                "lr": self.scheduler.get_last_lr()[0], "step_s": seconds,
                "samples_per_s": n * self.world_size / seconds, "gpu_hours": self.gpu_hours}

    def _refuse_non_finite(self, loss: torch.Tensor, losses: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        """Drop the step's gradients and raise, naming the step (numbered as the metrics and the progress number
        steps: step N is the one that makes self.step N), the batch and where a re-run resumes from."""
        self.optimizer.zero_grad(set_to_none=True)
        last = checkpoint.latest(self.cfg.output_root, self.cfg.run)
        raise NonFiniteLossError(
            f"step {self.step + 1}: loss is {loss.item()} (mse {losses['mse'].mean().item()}, vb "
            f"{losses['vb'].mean().item()}) on rank {self.rank}'s batch {self._where(batch)}; the step was not "
            f"applied. A re-run resumes from {last.rsplit('/', 1)[-1] if last else 'the start'}: lower optim.lr "
            f"(now {self.cfg.optim.lr:g}; a resume applies the new value) or check those samples' features.")

    def _where(self, batch: dict[str, Any]) -> str:
        """The batch's keys and the feature shards they come from (looked up in this rank's shard indexes: an
        error path only)."""
        if batch.get("shards") or not batch.get("keys"):
            return batch_keys(batch)
        try:
            wanted, found = set(map(str, batch["keys"])), set()
            for i in self.loader.stream_shards():
                if {e.key for e in shard_entries(i, self.loader.shards[i])} & wanted:
                    found.add(self.loader.shards[i].name)
            return batch_keys({**batch, "shards": sorted(found)})
        except Exception:  # noqa: BLE001 - never let the lookup hide the error being reported
            return batch_keys(batch)

    # -- checkpoints and samples --------------------------------------------------------------------------------------

    def sampling_model(self) -> torch.nn.Module | None:
        """The weights to sample with (the EMA when there is one), unsharded, on rank 0; None on other ranks. Under
        FSDP the shards are gathered first: every rank must call it."""
        whole = self.strategy.full_model(self.ema if self.ema is not None else self.model, keep=self.rank == 0)
        return whole.to(self.device) if whole is not None else None

    def save_checkpoint(self) -> str | None:
        """Publish the checkpoint of the current step from every state provider (pixart/train/state.py); every rank
        calls it (FSDP gathers), rank 0 writes. Returns its URL on rank 0."""
        return checkpoint.save_state(self.cfg.output_root, self.cfg.run, self.step, state_providers(self), self.rank,
                                     self.cfg.schedule.keep_checkpoints)

    def resume(self, url: str | None = None, log: Callable[[str], None] | None = None) -> bool:
        """Load the run's latest checkpoint (or `url`) into every state provider: weights, EMA, optimizer,
        schedule, step. False if none. A data.seed other than the checkpoint's is refused; changed optimizer
        hyperparameters are applied from here on and said through `log`."""
        url = url or checkpoint.latest(self.cfg.output_root, self.cfg.run)
        if url is None:
            if log is not None and self.init_note():
                log(self.init_note())  # a fresh run: say which weights start it
            return False
        saved = checkpoint.load_state(url, state_providers(self))
        Optimizer(self).use_config(saved, url, log)  # the config's hyperparameters, from this step on
        return True

    # -- the loop -----------------------------------------------------------------------------------------------------

    def fit(self, on_checkpoint: Callable[[str | None, int], None] | None = None,
            before_checkpoint: Callable[[int], None] | None = None) -> Iterator[dict[str, float]]:
        """Train up to schedule.max_steps, yielding each step's metrics; checkpoint every checkpoint_every steps
        and at the end. `before_checkpoint(step)` runs before each save (what must be on disk whenever the
        checkpoint exists: the metrics up to its step), `on_checkpoint(url, step)` after it."""
        sched = self.cfg.schedule
        if self.step >= sched.max_steps:
            return
        for batch in self.batches():
            metrics = self.train_step(batch)
            yield metrics
            if self.step % sched.checkpoint_every == 0 or self.step >= sched.max_steps:
                if before_checkpoint is not None:
                    before_checkpoint(self.step)
                url = self.save_checkpoint()
                if on_checkpoint is not None:
                    on_checkpoint(url, self.step)
            if self.step >= sched.max_steps:
                return

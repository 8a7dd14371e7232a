"""The training step and loop of every stage, as a library: no Prefect, no Ray (flows/_ray_train.py wraps it).

    prepare_run(cfg)                          # once, on the driver: checks features, encodes the null caption
    trainer = Trainer(cfg, rank, world_size)  # model (init or re-param), AdamW, warm-up, EMA, loader
    trainer.resume(log=print)                 # from the run's latest checkpoint, if there is one; else says
                                              # which weights of cfg.init (init_weights) started it
    for metrics in trainer.fit(): ...         # steps up to schedule.max_steps; checkpoints, samples, metrics

One step: latents and padded T5 from the loader (with data.finish=device the posterior is sampled and the T5 rows
padded here, on the training device), t ~ U{0..999}, noise, q_sample, the model, the IDDPM hybrid loss
(pixart/train/diffusion.py; loss.decoder_cdf picks the t = 0 term's normal CDF), backward, clip at 0.01, AdamW, warm-up
schedule, EMA. Stage 1 drops 10 % of the labels to the null class 1000; stages 2-3 drop 10 % of the captions to the
null caption (T5("") and its mask, what diffusers' PixArtAlphaPipeline uses as the negative prompt, so guidance at
sampling matches training).

Determinism. Everything random in a step (t, noise, dropout) comes from a generator seeded by (seed, step, rank),
and the loader's batch for (step, rank) is fixed by its plan, so a run stopped and resumed from a checkpoint
computes exactly the steps an uninterrupted run would. Every rank runs the same number of steps per epoch (the
smallest rank's batch count), which DDP needs and which makes the loader position a function of the step alone:
checkpoints store the position of the trained step (`loader_state`), never the reader's, which runs ahead.

Resume. data.seed must be the checkpoint's (it fixes the data order and every step's randomness). The optimizer's
hyperparameters (optim.lr, betas, eps, weight_decay; warmup_steps, grad_clip and ema_decay are read from the config
anyway) are the config's: a changed value is applied from the resumed step on, said through `resume(log=...)` and
recorded in the checkpoints' trainer.json ("optimizer": what is used, "changes": when each changed).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pixart.data.finish import pad_text, sample_posterior
from pixart.data.loader import BucketedLoader, batches_per_rank, feature_shards, shard_entries
from pixart.data.prefetch import Prefetch
from pixart.features.encoders import resolve_device
from pixart.models import build_dit, build_pixart, dit_forward, init_like_pixart, pixart_forward
from pixart.train import checkpoint, sharding
from pixart.train.conditions import Conditions
from pixart.train.config import TrainConfig
from pixart.train.diffusion import IDDPM
from pixart.train.weights import InitSource, load_init, load_weights
from storage.configio import config_hash, dump_yaml
from storage.errors import ConfigError, PipelineError

NULL_CLASS = 1000  # DiT's classifier-free-guidance class


class NonFiniteLossError(PipelineError):
    """A NaN or inf loss: the step is not applied and the last checkpoint stays the latest."""


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def loader_state(step: int, steps_per_epoch: int, seed: int) -> dict[str, Any]:
    """The loader's position after `step` trained steps: a function of the step alone (equal steps per epoch)."""
    epoch, index = divmod(step, steps_per_epoch)
    return {"epoch": epoch, "seed": seed, "consumed": {0: index}}


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1, *, device: torch.device | None = None,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 conditions: Conditions | None = None) -> None:
        """`conditions`: the run's null caption and sample prompts when already in memory (a run being started
        writes nothing before its trainer is built); else read from runs/<run>/conditions.safetensors."""
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = device or resolve_device(cfg.device)
        self.autocast = self.device.type == "cuda" and cfg.precision != "float32"
        self.all_reduce_mean = all_reduce_mean or (lambda x: x)
        data = cfg.data
        shards = feature_shards(cfg.output_root, data.dataset, data.base_size, data.multi_scale, data.caption_set)
        if not shards:
            raise PipelineError(f"no committed feature shards for {data.dataset} at {data.base_size}"
                                f"{'-ms' if data.multi_scale else ''} (caption set {data.caption_set}) under "
                                f"{cfg.output_root}: run pixart extract first")
        on_device = data.finish == "device" or (data.finish == "auto" and self.device.type == "cuda")
        self.loader = BucketedLoader(shards, data.batch_size, seed=data.seed, rank=rank, world_size=world_size,
                                     max_tokens=data.max_tokens, sample_posterior=not on_device,
                                     pad_text=not on_device)
        self.steps_per_epoch = min(batches_per_rank(shards, data.batch_size, world_size))
        if self.steps_per_epoch == 0:
            raise PipelineError(f"a rank gets no full batch of {data.batch_size} per epoch ({len(shards)} shards "
                                f"over {world_size} workers): lower data.batch_size or add shards")
        self.conditions = (conditions or Conditions.load(cfg)) if cfg.stage > 1 else None
        if cfg.stage > 1 and self.conditions is None:
            raise PipelineError(f"run {cfg.run}: no null caption / sample prompts encoded by {cfg.t5_model} "
                                "(runs/<run>/conditions.safetensors); prepare_run(cfg) writes them before training")
        self.init_source: InitSource | None = None  # where cfg.init's weights came from (set by _build)
        self.init_record: dict[str, Any] | None = None  # the same for trainer.json (a resume keeps the checkpoint's)
        self.model = self._init_model().to(self.device).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval() if cfg.optim.ema_decay else None
        self.model_cls = type(self.model)  # before sharding, which swaps in a subclass
        self.forward_model = wrap(self.model) if wrap else self.model
        self.sharded = sharding.is_sharded(self.forward_model)  # FSDP: self.model is sharded in place
        if self.sharded and self.ema is not None:
            sharding.shard(self.ema)  # the same layout, so the EMA update runs shard by shard
        if cfg.model.compile:
            self.forward_model = torch.compile(self.forward_model)
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

    # -- model --------------------------------------------------------------------------------------------------------

    def _init_model(self) -> torch.nn.Module:
        """Built under a generator seeded by data.seed, so a fresh run has the same initial weights every time
        and on every rank."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.data.seed)
            return self._build()

    def _build(self) -> torch.nn.Module:
        cfg = self.cfg
        if cfg.stage == 1:
            model = build_dit(cfg.model, cfg.resolution)
            for block in model.transformer_blocks:
                # diffusers' label embedder drops labels itself in train mode, from the global RNG and in every
                # block independently; the step's seeded dropout (same labels for all blocks) replaces it
                block.norm1.emb.class_embedder.dropout_prob = 0.0
        else:
            model = build_pixart(cfg.model, cfg.resolution, caption_channels=self.conditions.width)
            init_like_pixart(model)
        if cfg.init:
            self.init_source = load_init(model, cfg, caption_channels=self.conditions.width if self.conditions
                                         else None)
            self.init_record = self.init_source.record(cfg.init)
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
            self.loader.load_state_dict(loader_state(position, self.steps_per_epoch, self.cfg.data.seed))
            epoch = self.loader.epoch
            for batch in self.loader:
                position += 1
                yield batch
                if self.loader.consumed[0] >= self.steps_per_epoch:
                    break
            else:  # ran dry before steps_per_epoch: retrying the same epoch would spin, and the ranks would part
                raise PipelineError(f"rank {self.rank}: epoch {epoch} gave {self.loader.consumed.get(0, 0)} batches, "
                                    f"fewer than the {self.steps_per_epoch} steps per epoch counted at the start; "
                                    "did the feature shards change under the run?")

    # -- one step -----------------------------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        cfg, dev = self.cfg, self.device
        start = time.perf_counter()
        if "latents" in batch:
            x0 = batch["latents"].to(dev, non_blocking=True)
        else:  # sampled here, on the training device (data.finish)
            x0 = sample_posterior(batch["posterior"].to(dev, non_blocking=True), batch["noise_seed"],
                                  self.loader.scaling_factor)
        n = x0.shape[0]
        gen = step_generator(cfg.data.seed, self.step, self.rank)
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(n, generator=gen) < cfg.caption_dropout
        any_t0 = bool((t == 0).any())
        t, noise = t.to(dev), noise.to(dev)
        x_t = self.diffusion.q_sample(x0, t, noise)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast):
            if cfg.stage == 1:
                if "cls" not in batch:
                    raise ConfigError(f"step {self.step + 1}: batch {_keys(batch)} has no class labels; stage 1 "
                                      f"needs class-labelled latents (features/{cfg.data.dataset} has none)")
                labels = torch.where(drop, NULL_CLASS, batch["cls"]).to(dev)
                out = dit_forward(self.forward_model, x_t, t, labels)
            else:
                if "text" in batch:
                    text, mask = batch["text"], batch["mask"]
                else:  # padded here, on the training device (data.finish)
                    text, mask = pad_text(batch["text_rows"].to(dev, non_blocking=True), batch["n_tokens"],
                                          self.loader.max_tokens)
                text, mask = self.conditions.drop(text, mask, drop)
                micro = {}
                if cfg.model.multi_scale:
                    micro = {"img_hw": batch["img_hw"].to(dev), "aspect_ratio": batch["aspect_ratio"][:, None].to(dev)}
                text = text.to(dev, non_blocking=True).float()  # fp16 over the bus; the model casts it (autocast)
                out = pixart_forward(self.forward_model, x_t, t, text, mask.to(dev), **micro)
        losses = self.diffusion.training_losses(out.float(), x0, x_t, t, noise, any_t0=any_t0)
        loss = losses["loss"].mean()
        if not torch.isfinite(loss.detach()).item():
            self.optimizer.zero_grad(set_to_none=True)
            last = checkpoint.latest(cfg.output_root, cfg.run)
            # numbered as the metrics and the progress number steps: step N is the one that makes self.step N
            raise NonFiniteLossError(
                f"step {self.step + 1}: loss is {loss.item()} (mse {losses['mse'].mean().item()}, vb "
                f"{losses['vb'].mean().item()}) on rank {self.rank}'s batch {self._where(batch)}; the step was not "
                f"applied. A re-run resumes from {last.rsplit('/', 1)[-1] if last else 'the start'}: lower optim.lr "
                f"(now {cfg.optim.lr:g}; a resume applies the new value) or check those samples' features.")
        loss.backward()
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()),
                                     1 - cfg.optim.ema_decay)
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

    def _where(self, batch: dict[str, Any]) -> str:
        """The batch's keys and the feature shards they come from (looked up in this rank's shard indexes: an
        error path only)."""
        if batch.get("shards") or not batch.get("keys"):
            return _keys(batch)
        try:
            wanted, found = set(map(str, batch["keys"])), set()
            for i in self.loader.stream_shards():
                if {e.key for e in shard_entries(i, self.loader.shards[i])} & wanted:
                    found.add(self.loader.shards[i].name)
            return _keys({**batch, "shards": sorted(found)})
        except Exception:  # noqa: BLE001 - never let the lookup hide the error being reported
            return _keys(batch)

    def _clip(self) -> float:
        """Clip the global gradient norm. Stage 1: diffusers' DiT keeps one copy of the timestep/label embedder per
        block where the original shares one; their gradients are summed into every copy (the shared parameter's
        gradient), so the copies stay equal and the re-param can use them. The norm counts them once."""
        params = list(self.forward_model.parameters())
        if self.cfg.stage == 1:
            blocks = self.model.transformer_blocks
            copies = list(zip(*(b.norm1.emb.parameters() for b in blocks), strict=True))
            skip = {id(p) for group in copies for p in group[1:]}
            for group in copies:
                grads = [p.grad for p in group if p.grad is not None]
                if grads:
                    total = torch.stack(grads).sum(0)
                    group[0].grad = total
            params = [p for p in params if id(p) not in skip]
        clip = getattr(self.forward_model, "clip_grad_norm_", None)  # FSDP shards the norm
        norm = clip(self.cfg.optim.grad_clip) if clip else torch.nn.utils.clip_grad_norm_(params,
                                                                                           self.cfg.optim.grad_clip)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
            norm = norm.full_tensor()
        if self.cfg.stage == 1:
            for group in copies:
                if group[0].grad is not None:
                    for p in group[1:]:
                        p.grad = group[0].grad.clone()
        return float(norm)

    # -- checkpoints --------------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint records: the position (the loader's is the trained step's, not the reader's, which
        runs ahead under prefetch) and the hyperparameters actually in use."""
        return {"step": self.step, "epoch": self.step // self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch, "world_size": self.world_size, "stage": self.cfg.stage,
                "lr": self.scheduler.base_lrs[0], "lr_scheduler": self.scheduler.state_dict(),
                "loader": loader_state(self.step, self.steps_per_epoch, self.cfg.data.seed),
                "optimizer": self.hyperparameters(), "changes": list(self.changes),
                "gpu_hours": self.gpu_hours, "samples_seen": self.samples_seen,
                "config_hash": config_hash(self.cfg), "strategy": self.strategy, "init": self.init_record}

    def hyperparameters(self) -> dict[str, Any]:
        """The optimizer's settings in use (lr: the peak, after lr_scaling), from the optimizer itself."""
        group = self.optimizer.param_groups[0]
        optim = self.cfg.optim
        return {"lr": self.scheduler.base_lrs[0], "betas": list(group["betas"]), "eps": group["eps"],
                "weight_decay": group["weight_decay"], "warmup_steps": optim.warmup_steps,
                "grad_clip": optim.grad_clip, "ema_decay": optim.ema_decay}

    @property
    def strategy(self) -> str:
        return "fsdp" if self.sharded else "ddp"

    def sampling_model(self) -> torch.nn.Module | None:
        """The weights to sample with (the EMA when there is one), unsharded, on rank 0; None on other ranks. Under
        FSDP the shards are gathered first: every rank must call it."""
        source = self.ema if self.ema is not None else self.model
        if not self.sharded:
            return source if self.rank == 0 else None
        state = sharding.full_state(source)
        if self.rank != 0:
            return None
        return sharding.plain_copy(self.model_cls, self.model.config, state).to(self.device)

    def save_checkpoint(self) -> str | None:
        """Rank 0 publishes the checkpoint of the current step (DDP replicas are identical; FSDP shards are gathered
        first, on every rank)."""
        if self.sharded:
            models = {"transformer": sharding.full_state(self.model)}
            if self.ema is not None:
                models["ema"] = sharding.full_state(self.ema)
            optimizer = sharding.full_optimizer_state(self.model, self.optimizer)
        if self.rank != 0:
            return None

        def write(d: Path) -> dict[str, Any]:
            if self.sharded:
                for name, state in models.items():
                    sharding.plain_copy(self.model_cls, self.model.config, state).save_pretrained(
                        d / name, safe_serialization=True)
                checkpoint.save_optimizer(optimizer, d)
            else:
                self.model.save_pretrained(d / "transformer", safe_serialization=True)
                if self.ema is not None:
                    self.ema.save_pretrained(d / "ema", safe_serialization=True)
                checkpoint.save_optimizer(self.optimizer.state_dict(), d)
            (d / "config.yaml").write_text(dump_yaml(self.cfg))
            return self.state()

        keep = self.cfg.schedule.keep_checkpoints
        return checkpoint.save(self.cfg.output_root, self.cfg.run, self.step, write, keep)

    def resume(self, url: str | None = None, log: Callable[[str], None] | None = None) -> bool:
        """Load the run's latest checkpoint (or `url`): weights, EMA, optimizer, schedule, step. False if none.
        A data.seed other than the checkpoint's is refused; changed optimizer hyperparameters are applied from
        here on and said through `log`."""
        url = url or checkpoint.latest(self.cfg.output_root, self.cfg.run)
        if url is None:
            if log is not None and self.init_note():
                log(self.init_note())  # a fresh run: say which weights start it
            return False
        state = checkpoint.trainer_state(url)
        seed = state.get("loader", {}).get("seed", self.cfg.data.seed)
        if seed != self.cfg.data.seed:
            raise ConfigError(f"{url} was trained with data.seed={seed}, this run has {self.cfg.data.seed}: the seed "
                              "fixes the data order and every step's randomness, so a resume cannot change it. "
                              f"Resume with data.seed={seed}, or start a new run from this checkpoint's weights "
                              "(init=...)")
        if state.get("strategy", "ddp") != self.strategy:
            raise PipelineError(f"{url} was written under {state.get('strategy', 'ddp')}, this run uses "
                                f"{self.strategy}: their optimizer states differ in layout; resume with the same "
                                "ray.strategy, or start a new run from this checkpoint's weights (init=...)")
        if state["world_size"] != self.world_size or state["steps_per_epoch"] != self.steps_per_epoch:
            raise PipelineError(f"{url} was written by {state['world_size']} workers with {state['steps_per_epoch']} "
                                f"steps per epoch; this run has {self.world_size} and {self.steps_per_epoch}. "
                                "Resume with the same ray.num_workers and data.batch_size, or start a new run.")
        local, cleanup = checkpoint.local_copy(url)
        try:
            ema_dir = Path(local) / "ema"
            for model, directory in ((self.model, Path(local) / "transformer"),
                                     (self.ema, ema_dir if ema_dir.exists() else Path(local) / "transformer")):
                if model is None:
                    continue
                if self.sharded:  # every rank reads the full weights; each keeps its shard
                    plain = self.model_cls.from_config(self.model.config)
                    load_weights(plain, directory, strict=True)
                    sharding.load_full_state(model, plain.state_dict())
                else:
                    load_weights(model, directory, strict=True)
            if self.sharded:
                optimizer = checkpoint.read_optimizer(Path(local), "cpu")
                sharding.load_full_optimizer_state(self.model, self.optimizer, optimizer)
            else:
                self.optimizer.load_state_dict(checkpoint.read_optimizer(Path(local), self.device))
        finally:
            cleanup()
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.step, self.gpu_hours = int(state["step"]), float(state["gpu_hours"])
        self.samples_seen = int(state["samples_seen"])
        self.changes = list(state.get("changes", []))
        self.init_record = state.get("init", self.init_record)  # what the run really started from
        self._apply_hyperparameters(state, url, log)
        return True

    def _apply_hyperparameters(self, state: dict[str, Any], url: str, log: Callable[[str], None] | None) -> None:
        """The optimizer and scheduler states just loaded carry the checkpoint's lr, betas, eps and weight decay;
        set the config's instead, and record (and say) each one that differs from what the checkpoint used."""
        used = dict(state.get("optimizer") or {})
        group = self.optimizer.param_groups[0]
        used.update(lr=self.scheduler.base_lrs[0], betas=list(group["betas"]), eps=group["eps"],
                    weight_decay=group["weight_decay"])  # what the loaded states really hold
        optim = self.cfg.optim
        for g in self.optimizer.param_groups:
            g.update(betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay, initial_lr=self.lr)
        self.scheduler.base_lrs = [self.lr] * len(self.optimizer.param_groups)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        now = self.hyperparameters()
        for key, value in now.items():
            if key in used and used[key] != value:
                self.changes.append({"step": self.step, "key": f"optim.{key}", "was": used[key], "now": value})
                if log is not None:
                    note = " (the peak lr after lr_scaling)" if key == "lr" and optim.lr_scaling != "none" else ""
                    log(f"{url.rsplit('/', 1)[-1]} used optim.{key}={used[key]}; this run has {value}{note}: "
                        f"applied from step {self.step + 1} on, and recorded in the next checkpoints")

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


def _keys(batch: dict[str, Any], most: int = 8) -> str:
    """The batch's sample keys (and shards, when it carries them) for a message."""
    keys = [str(k) for k in batch.get("keys", [])]
    text = ", ".join(keys[:most]) + (f" (+{len(keys) - most} more)" if len(keys) > most else "") if keys else "?"
    shards = batch.get("shards")
    if shards:
        text += f" from shards {', '.join(sorted({str(x) for x in shards}))}"
    return f"[{text}]"

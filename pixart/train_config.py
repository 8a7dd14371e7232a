"""Config of the training stages. Presets live in `configs/train/` (stage1, stage2, stage3-512, stage3-1024 and
tiny variants); any key can be overridden with `key=value`.

Learning rate and batch size. PixArt-alpha's configs write lr 2e-5 and inherit `auto_lr = dict(rule="sqrt")`,
which multiplies it by sqrt(global_batch / 256) before building the optimizer (176 x 64 GPUs: x6.6, ~1.3e-4); the
paper just says "constant 2e-5". `optim.lr_scaling: sqrt` reproduces the official code, `none` (the default) uses
`optim.lr` as written. The effective lr is logged at start and stored in every checkpoint's trainer.json.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pixart.models import PRESETS, ModelConfig
from storage.config import StageConfig
from storage.configio import StrictModel

DEFAULT_T5 = "DeepFloyd/t5-v1_1-xxl"
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


class DataConfig(StrictModel):
    """Which committed feature shards to stream (see `pixart.data.feature_shards`)."""

    dataset: str = Field(description="Feature dataset: imagenet (stage 1), sam (stage 2), journeydb (stage 3).")
    caption_set: str | None = Field(None, description="Caption set of the text features; None for imagenet.")
    base_size: Literal[256, 512, 1024] = Field(256, description="Latents under features/<dataset>/latents/<size>.")
    multi_scale: bool = Field(False, description="Aspect-ratio bucketed latents (latents/<size>-ms).")
    batch_size: int = Field(32, gt=0, description="Samples per step per worker (global batch = x num_workers).")
    seed: int = Field(0, description="Seeds the shard order, the posterior noise, timesteps and dropout.")
    max_tokens: int = Field(120, gt=0, description="T5 tokens per caption after padding.")
    prefetch: int | None = Field(None, ge=0, description="Batches read ahead in a background thread; None: 2 on "
                                 "GPU, 0 on CPU (where the step's own threads need the cores).")
    finish: Literal["auto", "loader", "device"] = Field(
        "auto", description="Where each batch is finished (latents sampled from the stored posterior, T5 padded to "
        "max_tokens with its mask): loader (on its CPU thread), device (in the step, on the training device: the "
        "loader hands over the fp16 posterior, noise seeds and only the valid T5 rows, so there is no noise to draw "
        "and no padding to zero or send); auto: device on GPU, loader on CPU. Same batches either way, except that "
        "CUDA draws other noise than the CPU for the same seeds.")


class OptimConfig(StrictModel):
    """AdamW with a constant lr after a linear warm-up, gradient clipping and an optional EMA (PixArt-alpha)."""

    lr: float = Field(2e-5, gt=0, description="Peak learning rate (before lr_scaling).")
    lr_scaling: Literal["none", "sqrt"] = Field("none", description="sqrt: lr x sqrt(global_batch / 256), the "
                                                "official configs' auto_lr; none: lr as written.")
    weight_decay: float = Field(0.03, ge=0)
    eps: float = Field(1e-10, gt=0)
    betas: tuple[float, float] = Field((0.9, 0.999))
    warmup_steps: int = Field(1000, ge=0, description="Linear warm-up from 0, then constant.")
    grad_clip: float = Field(0.01, gt=0, description="Max global gradient norm (0.01 in every alpha config).")
    ema_decay: float | None = Field(0.9999, gt=0, lt=1, description="EMA of the weights; None: no EMA.")


class ScheduleConfig(StrictModel):
    max_steps: int = Field(description="Optimizer steps of this stage (a re-run continues up to it).", gt=0)
    checkpoint_every: int = Field(1000, gt=0, description="Steps between checkpoints (and one at the end).")
    keep_checkpoints: int = Field(3, gt=0, description="Checkpoints kept; older ones are deleted.")
    log_every: int = Field(10, gt=0, description="Steps between metric lines (metrics.jsonl).")
    sample_every: int = Field(0, ge=0, description="Steps between sample grids; 0: only at the end.")
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["a photograph of a red fox in the snow", "a watercolor painting of a lighthouse",
                                 "a bowl of ramen, studio lighting", "an astronaut riding a horse on mars"],
        description="Fixed prompts of the sample grids (stage 1: the class ids of sample_classes).")
    sample_classes: list[int] = Field(default_factory=lambda: [207, 360, 387, 974], description="Stage 1 grids.")
    sample_steps: int = Field(20, gt=0, description="DPM-Solver++ steps.")
    cfg_scale: float = Field(4.5, ge=1, description="Classifier-free guidance scale of the sample grids.")


class RayTrainConfig(StrictModel):
    """Ray Train execution (the `train` flow and `pixart train executor=ray`)."""

    address: str | None = Field(None, description="Cluster address; None: RAY_ADDRESS if set, else a local Ray.")
    num_workers: int = Field(1, gt=0, description="Training workers (one per GPU).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="Data parallelism: ddp (a full replica per worker) "
                                              "or fsdp (FSDP2: weights, gradients and AdamW state sharded across the "
                                              "workers; checkpoints are gathered into the same layout). A run "
                                              "resumes only under the strategy that wrote it.")
    max_failures: int = Field(3, ge=0, description="Worker-group restarts (each resumes from the last checkpoint).")
    object_store_memory: int = Field(300_000_000, gt=0, description="Local Ray only: object store bytes (the "
                                     "loader reads shards itself, so Ray needs little).")
    include_dashboard: bool = Field(False, description="Local Ray only: start the dashboard.")
    cpus_per_worker: float = Field(1.0, gt=0)


class TrainConfig(StageConfig):
    """One training stage: PixArt-alpha stage 1 (class-conditional DiT on ImageNet), 2 (text-image alignment on
    SAM) or 3 (high aesthetics at 512, then 1024 multi-scale). Outputs go to `<output_root>/runs/<run>/`."""

    stage: Literal[1, 2, 3] = Field(description="1: DiT on ImageNet classes; 2 and 3: PixArt on T5 features.")
    run: str = Field(description="Run name: runs/<run>/ under output_root. A re-run of the same name resumes.")
    model: ModelConfig
    data: DataConfig
    init: str | None = Field(None, description="Start from: a run's checkpoint dir, an export, a diffusers "
                             "transformer dir or id, or (stage 2) a DiT to re-parameterise. None: random init.")
    init_kind: Literal["auto", "checkpoint", "pixart", "dit"] = Field(
        "auto", description="How to read init; auto: a checkpoint if it holds trainer.json, else by its config.")
    reparam_t: int = Field(500, ge=0, lt=1000, description="DiT -> PixArt re-param matching timestep (paper: 500).")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="Share of captions (stage 1: labels) replaced by "
                                   "the null caption (class) for classifier-free guidance.")
    t5_model: str = Field(DEFAULT_T5, description="T5 the features came from: encodes the null caption and the "
                          "sample prompts, and is named in the export.")
    vae_model: str = Field(DEFAULT_VAE, description="VAE of the latents: decodes sample grids; named in the export.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto")
    precision: Literal["auto", "bfloat16", "float32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 "
                                                               "on CPU.")
    executor: Literal["local", "ray"] = Field("local", description="local: this process; ray: Ray Train workers.")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig
    ray: RayTrainConfig = Field(default_factory=RayTrainConfig)

    @property
    def resolution(self) -> int:
        return self.data.base_size

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        kind = "dit" if PRESETS[self.model.preset]["norm_type"] == "ada_norm_zero" else "pixart"
        if self.stage == 1 and kind != "dit":
            raise ValueError(f"stage 1 trains a class-conditional DiT; model.preset {self.model.preset!r} is PixArt")
        if self.stage > 1 and kind != "pixart":
            raise ValueError(f"stage {self.stage} trains PixArt; model.preset {self.model.preset!r} is a DiT")
        if self.stage == 1 and self.data.caption_set:
            raise ValueError("stage 1 trains on class labels: leave data.caption_set empty")
        if self.stage > 1 and not self.data.caption_set:
            raise ValueError(f"stage {self.stage} needs data.caption_set (the T5 features of a caption set)")
        if self.model.multi_scale != self.data.multi_scale:
            raise ValueError(f"model.multi_scale={self.model.multi_scale} but data.multi_scale="
                             f"{self.data.multi_scale}: multi-scale latents need the micro-condition embedders")
        return self

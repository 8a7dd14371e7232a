"""Config of the training stages. Presets live in `configs/train/` (stage1, stage2, and stage 3's three steps
stage3-256, stage3-512, stage3-1024, plus tiny variants); any key can be overridden with `key=value`.

Stage 3 is three steps (paper Table 4), each its own run initialised from the one before: hq256 (90K steps at 256
on the high-aesthetics data, from stage 2; the official PixArt_xl2_img256_internal), hq512 (100K steps at 512) and
ms1024 (16K steps at 1024 multi-scale). A stage-3 config names its step (`stage_step`), so none is skipped silently:
the presets are `stage3-256`, `stage3-512` and `stage3-1024` (`STAGE_PRESETS`), and a step's init must be the
previous step's run (`STAGE3_INIT`, checked before a run starts) unless `init_any_step` says otherwise.

Learning rate and batch size. PixArt-alpha's configs write lr 2e-5 and inherit `auto_lr = dict(rule="sqrt")`,
which multiplies it by sqrt(global_batch / 256) before building the optimizer (176 x 64 GPUs: x6.6, ~1.3e-4); the
paper just says "constant 2e-5". `optim.lr_scaling: sqrt` reproduces the official code, `none` (the default) uses
`optim.lr` as written. The effective lr is logged at start and stored in every checkpoint's trainer.json.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pixart.model_config import PRESETS, ModelConfig
from storage.config import DEFAULT_MAX_TOKENS, DEFAULT_T5, DEFAULT_VAE, Dataset, OutputConfig, RayConfig
from storage.configio import StrictModel
from storage.lineage import RuntimeField

# Stage 3's steps in the paper's order: the resolution each trains at and whether it must be multi-scale
# (hq256 and hq512 may also run multi-scale, as the official *_internalms configs do; ms1024 must).
STAGE3_STEPS: dict[str, tuple[int, bool]] = {"hq256": (256, False), "hq512": (512, False), "ms1024": (1024, True)}
# What each stage-3 step starts from: the step before it, (stage, stage_step) as a run's trainer.json records them
STAGE3_INIT: dict[str, tuple[int, str | None]] = {"hq256": (2, None), "hq512": (3, "hq256"), "ms1024": (3, "hq512")}
# (stage, stage 3's step) -> its preset under configs/train/
STAGE_PRESETS: dict[tuple[int, str | None], str] = {(1, None): "stage1", (2, None): "stage2",
                                                    (3, "hq256"): "stage3-256", (3, "hq512"): "stage3-512",
                                                    (3, "ms1024"): "stage3-1024"}


class DataConfig(StrictModel):
    """Which committed feature shards to stream (see `pixart.data.loader.feature_shards`)."""

    dataset: Dataset = Field(description="Feature dataset: imagenet (stage 1), sam (stage 2), journeydb (stage 3).")
    caption_set: str | None = Field(None, description="Caption set of the text features; None for imagenet.")
    base_size: Literal[256, 512, 1024] = Field(256, description="Latents under features/<dataset>/latents/<size>.")
    multi_scale: bool = Field(False, description="Aspect-ratio bucketed latents (latents/<size>-ms).")
    batch_size: int = Field(32, gt=0, description="Samples per step per worker (global batch = x num_workers).")
    seed: int = Field(0, description="Seeds the shard order, the posterior noise, timesteps and dropout.")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, gt=0, description="T5 tokens per caption after padding.")
    prefetch: int | None = RuntimeField(None, ge=0,
                                        description="Batches read ahead in a background thread; None: 2 on "
                                 "GPU, 0 on CPU (where the step's own threads need the cores).")
    finish: Literal["auto", "loader", "device"] = RuntimeField(
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
    weight_decay: float = Field(0.03, ge=0, description="AdamW weight decay.")
    eps: float = Field(1e-10, gt=0, description="AdamW epsilon.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(1000, ge=0, description="Linear warm-up from 0, then constant.")
    grad_clip: float = Field(0.01, gt=0, description="Max global gradient norm (0.01 in every alpha config).")
    ema_decay: float | None = Field(0.9999, gt=0, lt=1, description="EMA of the weights; None: no EMA.")


# The fixed prompts and ImageNet classes of sample grids (training's and `pixart sample`'s).
SAMPLE_PROMPTS = ("a photograph of a red fox in the snow", "a watercolor painting of a lighthouse",
                  "a bowl of ramen, studio lighting", "an astronaut riding a horse on mars")
SAMPLE_CLASSES = (207, 360, 387, 974)
ClassId = Annotated[int, Field(ge=0, lt=1000)]


class ScheduleConfig(StrictModel):
    max_steps: int = Field(description="Optimizer steps of this stage (a re-run continues up to it).", gt=0)
    checkpoint_every: int = RuntimeField(1000, gt=0, description="Steps between checkpoints (and one at the end).")
    keep_checkpoints: int = RuntimeField(3, gt=0, description="Checkpoints kept; older ones are deleted.")
    log_every: int = RuntimeField(10, gt=0, description="Steps between metric lines (metrics.jsonl).")
    sample_every: int = RuntimeField(0, ge=0, description="Steps between sample grids; 0: only at the end.")
    sample_prompts: list[str] = RuntimeField(default_factory=lambda: list(SAMPLE_PROMPTS),
                                             description="Fixed prompts of "
                                      "the sample grids (stage 1: the class ids of sample_classes).")
    sample_classes: list[ClassId] = RuntimeField(default_factory=lambda: list(SAMPLE_CLASSES),
                                          description="ImageNet class ids of stage 1's grids.")
    sample_steps: int = RuntimeField(20, gt=0, description="DPM-Solver++ steps.")
    cfg_scale: float = RuntimeField(4.5, ge=1, description="Classifier-free guidance scale of the sample grids.")


class LossConfig(StrictModel):
    """The IDDPM hybrid loss (pixart/train/diffusion.py)."""

    decoder_cdf: Literal["tanh", "exact"] = Field(
        "tanh", description="Normal CDF of the t = 0 decoder term (the discretised Gaussian likelihood): tanh, the "
        "official code's approximation (default); exact, the true CDF, which moves the t = 0 VB term by 0.5-1 %.")


class RayTrainConfig(RayConfig):
    """Ray Train execution (the `train` flow and `pixart train executor=ray`)."""

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
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker.")


class TrainConfig(OutputConfig):
    """One training stage: PixArt-alpha stage 1 (class-conditional DiT on ImageNet), 2 (text-image alignment on
    SAM) or one step of 3 (high aesthetics at 256, then 512, then 1024 multi-scale). Outputs go to
    `<output_root>/runs/<run>/`."""

    renamed_keys = {"precision": "dtype"}

    stage: Literal[1, 2, 3] = Field(description="1: DiT on ImageNet classes; 2 and 3: PixArt on T5 features.")
    stage_step: Literal["hq256", "hq512", "ms1024"] | None = Field(
        None, description="Stage 3's step (required there, empty for stages 1 and 2), run in this order, each from "
        "the previous one's weights: hq256 (90K steps at 256, from stage 2), hq512 (100K at 512), ms1024 (16K at "
        "1024 multi-scale). It must agree with data.base_size (and ms1024 with data.multi_scale).")
    run: str = Field(description="Run name: runs/<run>/ under output_root. A re-run of the same name resumes.")
    model: ModelConfig
    data: DataConfig
    init: str | None = Field(None, description="Start from: a run's checkpoint dir, an export, a diffusers "
                             "transformer dir or id, or (stage 2) a DiT to re-parameterise. None: random init.")
    init_any_step: bool = Field(
        False, description="Stage 3 only: let a step start from something other than the previous step of the chain "
        "(stage 2 -> hq256 -> hq512 -> ms1024), or from random weights (no init). Off, a stage-3 step needs an "
        "init, and an init that records its stage (a run or checkpoint of this project) must be the previous "
        "step; an init that records none (an external transformer, a hub pipeline) is accepted and the log says "
        "so.")
    init_kind: Literal["auto", "checkpoint", "pixart", "dit"] = Field(
        "auto", description="How to read init; auto: a checkpoint if it holds trainer.json, a run directory "
        "(runs/<run>) as its latest committed checkpoint, else by its config.")
    init_weights: Literal["model", "ema"] = Field(
        "model", description="Which weights of an init checkpoint start this stage: model (the trained weights, "
        "as the official load_from does) or ema. An export holds one of the two (its pixart_export.json says "
        "which): it must be the one named here. The run's log and trainer.json name the files loaded.")
    reparam_t: int = Field(500, ge=0, lt=1000, description="DiT -> PixArt re-param matching timestep (paper: 500).")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="Share of captions (stage 1: labels) replaced by "
                                   "the null caption (class) for classifier-free guidance.")
    t5_model: str = Field(DEFAULT_T5, description="T5 the features came from: encodes the null caption and the "
                          "sample prompts, and is named in the export.")
    vae_model: str = Field(DEFAULT_VAE, description="VAE of the latents: decodes sample grids; named in the export.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")
    dtype: Literal["auto", "bfloat16", "float32"] = Field("auto", description="Compute dtype; auto: bf16 autocast on "
                                                           "GPU, fp32 on CPU.")
    executor: Literal["local", "ray"] = RuntimeField("local",
                                                     description="local: this process; ray: Ray Train workers.")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    schedule: ScheduleConfig
    ray: RayTrainConfig = RuntimeField(default_factory=RayTrainConfig)

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
        if self.stage == 3 and self.stage_step is None:
            raise ValueError("stage 3 is three steps: set stage_step to hq256 (256 px, from stage 2), hq512 (512 px) "
                             "or ms1024 (1024 multi-scale); presets stage3-256, stage3-512, stage3-1024")
        if self.stage != 3 and self.stage_step is not None:
            raise ValueError(f"stage_step={self.stage_step} is a step of stage 3; stage {self.stage} has none")
        if self.stage_step is not None:
            size, multi_scale = STAGE3_STEPS[self.stage_step]
            if self.data.base_size != size or (multi_scale and not self.data.multi_scale):
                what = f"{size}{' multi-scale' if multi_scale else ''}"
                raise ValueError(f"stage_step={self.stage_step} trains at {what}, but data.base_size="
                                 f"{self.data.base_size}, data.multi_scale={self.data.multi_scale}")
        if self.model.multi_scale != self.data.multi_scale:
            raise ValueError(f"model.multi_scale={self.model.multi_scale} but data.multi_scale="
                             f"{self.data.multi_scale}: multi-scale latents need the micro-condition embedders")
        return self


# ---------------------------------------------------------------------------------------------------------------------
# Using a run: sample grids (`pixart sample`) and diffusers exports (`pixart export`); presets in configs/sample/ and
# configs/export/
# ---------------------------------------------------------------------------------------------------------------------


class SampleConfig(StrictModel):
    """A sample grid from a committed checkpoint, with the T5 and VAE its run names."""

    checkpoint: str = Field(description="A checkpoint directory, or a run directory (its latest committed one).")
    out: str = Field("samples.png", description="PNG to write.")
    weights: Literal["ema", "model"] = Field("ema", description="ema (the trained weights when the run kept no "
                                             "EMA) or model.")
    sample_prompts: list[str] = Field(default_factory=lambda: list(SAMPLE_PROMPTS), min_length=1,
                                      description="Prompts of the grid (text stages).")
    sample_classes: list[ClassId] = Field(default_factory=lambda: list(SAMPLE_CLASSES), min_length=1,
                                          description="ImageNet class ids of the grid (stage 1).")
    sample_steps: int = Field(20, gt=0, description="DPM-Solver++ steps.")
    cfg_scale: float = Field(4.5, ge=1, description="Classifier-free guidance scale.")
    seed: int = Field(0, description="Seeds the initial noise.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")


class ExportConfig(StrictModel):
    """A committed checkpoint as a diffusers pipeline directory (transformer + scheduler, naming the T5 and VAE)."""

    checkpoint: str = Field(description="A checkpoint directory, or a run directory (its latest committed one).")
    out: str = Field(description="Directory to write: PixArtAlphaPipeline.from_pretrained(out) loads it.")
    weights: Literal["ema", "model"] = Field("ema", description="ema (the trained weights when the run kept no "
                                             "EMA) or model.")
    bundle: bool = Field(False, description="Copy the T5 and VAE in, so the export stands alone.")
    force: bool = Field(False, description="Replace a different export at out.")

"""Cost and storage accounting of the pipeline: before a run, for each step of the plan, the samples it will process,
the bytes it will write under the output root and the GPU-hours it will take, each with its basis; after a run, the
measured figures beside them. `pixart status <preset> --estimate` prints the estimate; the `pixart-pipeline` flow
publishes it as the artifact `pixart-pipeline-estimate` before its steps run, and the comparison under its summary.

    rates = cfg.rate_card()                           # `rate_table` (configs/rates/h100.yaml) with `rates.<key>=`
    estimates = estimate_plan(cfg, rates)             # reads a sample of each source, committed manifests, captions
    print(estimate_text(estimates, rates))
    comparison_markdown(estimates, measure_plan(cfg)) # after the run: estimated vs measured

Where each step's figures come from (the arithmetic is `pixart/cost.py`):
- ingest: samples from the committed manifests (exact when every source shard has one), else from the first
  `SAMPLE_IMAGES` samples of the source, extrapolated by bytes and shards (`storage/ingest/sampling.py`); bytes: the
  manifests that sample makes (the images stay in the source; the basis says how much ingest reads); CPU only.
- caption: one per ok sample; token lengths and bytes per caption from a committed caption set (this step's, else
  another of the dataset), else max_new_tokens; GPU-hours at the LLaVA rate, scaled to max_new_tokens.
- extract: bytes per sample from the image sizes and token lengths (`pixart/features/estimate.py`), plus each shard's
  index; GPU-hours at the T5 and VAE rates.
- train: steps x global batch samples at the PixArt-XL/2 rate of the resolution; bytes: the checkpoints kept, from
  the model's parameter count.
- export: one fp32 copy of the exported model; CPU only.
Where outputs of a step already exist on this root, the rate their done markers (or the run's summary) recorded is
shown too: measured on whatever machine made them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flows.pipeline import Step, export_dir, plan
from flows.pipeline_config import PipelineConfig
from pixart.cost import (
    ADAM_BYTES,
    EMA_BYTES,
    MODEL_BYTES,
    Rates,
    caption_bytes,
    checkpoint_bytes,
    checkpoints_kept,
    extrapolate,
    feature_overhead,
    gpu_hours,
    grid_bytes,
    human_bytes,
    human_count,
    human_hours,
    parameter_count,
    train_samples,
)
from pixart.features.estimate import estimate, t5_width
from storage.commit import is_done, read_done
from storage.configio import load_config
from storage.errors import PipelineError, one_line
from storage.ingest.sampling import DatasetSample, committed_sample, sample_source
from storage.layout import caption_set_dir, captions_dir, latents_dir, run_dir, text_features_dir
from storage.manifest import committed_manifests
from storage.parquet import read_table
from storage.urls import exists, filesystem, open_url, to_url

SAMPLE_IMAGES = 64  # samples read from a source that has no committed manifests


@dataclass
class Measured:
    """What a step's committed outputs record: ok samples, stored bytes, and the seconds that made them."""

    samples: int = 0
    bytes: int = 0
    seconds: float = 0.0
    outputs: int = 0
    what: str = "shards"

    def rate(self) -> str:
        if not (self.samples and self.seconds):
            return ""
        return f"measured here: {self.samples / self.seconds:.3g} samples/s ({self.outputs} {self.what})"


@dataclass
class StepEstimate:
    step: str
    samples: float | None = None
    bytes: float | None = None
    gpu_hours: float | None = None  # 0 for CPU steps
    basis: str = ""
    measured: str = ""


@dataclass
class _Known:
    """What earlier steps found out, for the steps after them."""

    max_samples: int
    datasets: dict[str, DatasetSample] = field(default_factory=dict)
    tokens: dict[str, tuple[list[int], str]] = field(default_factory=dict)  # dataset -> (T5 tokens, where from)
    params: dict[str, int] = field(default_factory=dict)  # train step -> parameters

    def sample(self, dataset: str) -> tuple[DatasetSample, float]:
        if dataset not in self.datasets:
            raise PipelineError(f"no measured sample of {dataset} (see its ingest step)")
        s = self.datasets[dataset]
        return s, extrapolate(s.ok, s.shards_read, s.shards)


# ---------------------------------------------------------------------------------------------------------------------
# Reading what exists: committed outputs, their markers, caption sets
# ---------------------------------------------------------------------------------------------------------------------


def _size(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.du(path)) if fs.exists(path) else 0


def _committed(directory: str) -> list[str]:
    """The committed shard tables under `directory` (their markers hold a shard result)."""
    fs, path = filesystem(directory)
    if not fs.exists(path):
        return []
    urls = [to_url(fs, p) for p in sorted(fs.glob(f"{path}/*.parquet"))]
    return [u for u in urls if is_done(u) and "num_ok" in (read_done(u) or {})]


def _measure_shards(urls: list[str]) -> Measured:
    m = Measured()
    for url in urls:
        record = read_done(url) or {}
        m.samples += record.get("num_ok", 0)
        m.seconds += record.get("seconds", 0.0)
        m.outputs += 1
        m.bytes += _size(url) + (_size(record["tar_url"]) if record.get("tar_url") else 0)
    return m


@dataclass
class _CaptionSet:
    name: str
    tokens: list[int]
    rows: int
    bytes: int


def _caption_set(root: str, dataset: str, prefer: str, others: bool = True) -> _CaptionSet | None:
    """A committed caption set of `dataset`: `prefer`, else (with `others`) the first other one that has shards."""
    fs, path = filesystem(captions_dir(root, dataset))
    names = [prefer]
    if others and fs.exists(path):
        names += sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if fs.isdir(p))
    for name in dict.fromkeys(names):
        urls = _committed(caption_set_dir(root, dataset, name))
        if urls:
            tables = [read_table(u, ["t5_tokens", "status"]).to_pylist() for u in urls]
            rows = [r for t in tables for r in t]
            return _CaptionSet(name, [r["t5_tokens"] for r in rows if r["status"] == "ok" and r["t5_tokens"]],
                               len(rows), sum(_size(u) for u in urls))
    return None


# ---------------------------------------------------------------------------------------------------------------------
# One estimate per kind of step
# ---------------------------------------------------------------------------------------------------------------------


def _stage_config(step: Step) -> Any:
    """The step's stage config, as the step would run it (none for the export)."""
    if step.kind == "export":
        return None
    preset, args = step.resolve()
    if step.kind == "train":
        from flows.train_stage import load_train_config

        return load_train_config(preset, args)
    from captioning.config import CaptionConfig
    from pixart.features.config import ExtractConfig
    from storage.ingest.config import IngestConfig

    cls = {"ingest": IngestConfig, "caption": CaptionConfig, "extract": ExtractConfig}[step.kind]
    return load_config(cls, preset, args, kind=step.kind)


def _ingest(c, step: Step, known: _Known, rates: Rates) -> StepEstimate:
    from storage.ingest.shard import list_shards

    shards = list_shards(c)
    s = committed_sample(c, shards) or sample_source(c, shards, known.max_samples)
    known.datasets[c.dataset] = s
    what = "committed manifests" if s.committed else f"the first {s.rows} samples"
    where = f"{what}: all {s.shards} shards (exact)" if s.exact else \
        f"{what} ({s.shards_read:.3g} of {s.shards} shards) x {s.shards / s.shards_read:.3g}"
    reads = human_bytes(extrapolate(s.image_bytes, s.shards_read, s.shards))
    return StepEstimate(step.name, extrapolate(s.ok, s.shards_read, s.shards),
                        extrapolate(s.manifest_bytes, s.shards_read, s.shards), 0.0,
                        f"{where}; writes manifests, reads {reads} of images")


def _caption(c, step: Step, known: _Known, rates: Rates) -> StepEstimate:
    s, n = known.sample(c.dataset)
    new = c.generation.max_new_tokens
    found = _caption_set(c.output_root, c.dataset, c.resolved_caption_set())
    if found is not None and found.tokens:
        tokens, size, source = found.tokens, found.bytes / found.rows * n, f"caption set {found.name}"
        where = f"T5 tokens (mean {sum(tokens) / len(tokens):.0f}) and bytes per caption of {source}"
    else:
        tokens, size, source = [new + 1], caption_bytes(n, s.shards, new + 1), f"max_new_tokens={new} + EOS"
        where = f"no caption set yet: {source} tokens per caption"
    known.tokens[c.dataset] = (tokens, source)
    rate = rates.caption_at(new)
    return StepEstimate(step.name, n, size, gpu_hours(n, rate),
                        f"1 per ok sample; {where}; LLaVA {rate:.3g}/s ({rates.caption:g} at "
                        f"{rates.caption_new_tokens} new tokens, scaled to {new})")


def _extract(c, step: Step, known: _Known, rates: Rates) -> StepEstimate:
    s, n = known.sample(c.dataset)
    layout = {"base_size": c.base_size, "multi_scale": c.multi_scale, "policy": c.bucket_policy,
              "d_model": t5_width(c.t5_model), "max_tokens": c.max_tokens}
    samples = size = hours = 0.0
    parts = []
    if c.encodes_text:
        found = _caption_set(c.output_root, c.dataset, c.caption_set or "", others=False)
        tokens, where = (found.tokens, f"caption set {found.name}") if found and found.tokens else \
            known.tokens.get(c.dataset, ([c.max_tokens], "max_tokens"))
        per = estimate([], tokens, **layout)["text_bytes_per_sample"]
        samples, size, hours = samples + n, size + n * per, hours + gpu_hours(n, rates.t5)
        parts.append(f"text {human_bytes(per)}/sample (T5 width {layout['d_model']}, tokens of {where}); "
                     f"T5 {rates.t5:g}/s")
    if c.what in ("latents", "both"):
        per = estimate(s.sizes, [], **layout)["latent_bytes_per_sample"]
        vae = rates.vae(c.base_size, fp32=c.dtype == "float32")
        samples, size, hours = samples + n, size + n * per, hours + gpu_hours(n, vae)
        parts.append(f"latents {human_bytes(per)}/sample at {c.base_size}{' multi-scale' if c.multi_scale else ''} "
                     f"from {len(s.sizes)} image sizes; VAE {vae:g}/s")
    kinds = len(parts)
    size += feature_overhead(n * kinds, round(s.shards * kinds))
    return StepEstimate(step.name, samples, size, hours, "; ".join(parts))


def _train(c, step: Step, known: _Known, rates: Rates) -> StepEstimate:
    from pixart.train.monitor import PAPER_V100_DAYS

    workers = c.ray.num_workers if c.executor == "ray" else 1
    sched = c.schedule
    n = train_samples(sched.max_steps, c.data.batch_size, workers)
    params = parameter_count(c.model, c.resolution, None if c.stage == 1 else t5_width(c.t5_model))
    known.params[step.name] = params
    kept = checkpoints_kept(sched.max_steps, sched.checkpoint_every, sched.keep_checkpoints)
    ema = c.optim.ema_decay is not None
    per_param = MODEL_BYTES + (EMA_BYTES if ema else 0) + ADAM_BYTES
    images = len(sched.sample_classes if c.stage == 1 else sched.sample_prompts)
    grids = grid_bytes(images, c.resolution, sched.max_steps, sched.sample_every)
    rate = rates.train(c.resolution)
    hours = gpu_hours(n, rate)
    wall = f", {hours / workers:.3g} h on {workers} GPUs" if workers > 1 else ""
    return StepEstimate(step.name, n, checkpoint_bytes(params, ema, kept) + grids, hours,
                        f"{sched.max_steps} steps x {c.data.batch_size} x {workers} worker(s); {kept} checkpoints of "
                        f"{human_count(params)} params x {per_param} B + {human_bytes(grids)} of sample grids; "
                        f"PixArt-XL/2 {rate:g}/s at {c.resolution}{wall}; paper: "
                        f"{PAPER_V100_DAYS[c.stage_step or c.stage]} V100-days")


def _export(c, step: Step, known: _Known, rates: Rates, cfg: PipelineConfig) -> StepEstimate:
    train_step = f"train-{cfg.export}"
    if train_step not in known.params:
        raise PipelineError(f"no parameter count of {train_step}")
    params = known.params[train_step]
    return StepEstimate(step.name, None, params * MODEL_BYTES, 0.0,
                        f"{train_step}'s {human_count(params)} params x {MODEL_BYTES} B (fp32 safetensors; T5 and "
                        f"VAE not bundled)")


# ---------------------------------------------------------------------------------------------------------------------
# What a step's outputs on this root record
# ---------------------------------------------------------------------------------------------------------------------


def _measure(c, step: Step, cfg: PipelineConfig) -> Measured:
    if step.kind == "ingest":
        return _measure_shards(committed_manifests(c.output_root, c.dataset))  # bytes: the manifests
    if step.kind == "caption":
        return _measure_shards(_committed(caption_set_dir(c.output_root, c.dataset, c.resolved_caption_set())))
    if step.kind == "extract":
        dirs = [latents_dir(c.output_root, c.dataset, c.base_size, c.multi_scale)] if c.what != "text" else []
        if c.encodes_text:
            dirs.append(text_features_dir(c.output_root, c.dataset, c.caption_set))
        return _measure_shards([u for d in dirs for u in _committed(d)])
    if step.kind == "train":
        return _measure_run(c.output_root, c.run)
    return Measured(bytes=_size(export_dir(cfg)), outputs=int(exists(export_dir(cfg))), what="exports")


def _measure_run(root: str, run: str) -> Measured:
    import json

    from pixart.train import checkpoint
    from pixart.train.monitor import summary_url

    latest = checkpoint.latest(root, run)
    if latest is None:
        return Measured()
    url, summary = summary_url(root, run), {}
    if exists(url):
        with open_url(url, "rb") as f:
            summary = json.loads(f.read())
    samples = checkpoint.trainer_state(latest).get("samples_seen", 0)
    rate = summary.get("mean_samples_per_s")  # all workers together; GPU-hours are counted on GPUs only
    seconds = summary.get("gpu_hours", 0.0) * 3600 or (samples / rate if rate else 0.0)
    return Measured(samples, _size(run_dir(root, run)), seconds, len(checkpoint.list_checkpoints(root, run)),
                    "checkpoints")


# ---------------------------------------------------------------------------------------------------------------------
# The plan's estimate, its measurement, and their tables
# ---------------------------------------------------------------------------------------------------------------------


def estimate_plan(cfg: PipelineConfig, rates: Rates, max_samples: int = SAMPLE_IMAGES) -> list[StepEstimate]:
    """One estimate per step of the plan, in order; a step that cannot be estimated says why in its basis."""
    known = _Known(max_samples)
    out = []
    for step in plan(cfg):
        try:
            c = _stage_config(step)
            if step.kind == "export":
                est = _export(c, step, known, rates, cfg)
            else:
                est = {"ingest": _ingest, "caption": _caption, "extract": _extract, "train": _train}[step.kind](
                    c, step, known, rates)
            est.measured = _measure(c, step, cfg).rate()
        except (PipelineError, OSError, ValueError) as e:  # ValueError: a config a step cannot load
            est = StepEstimate(step.name, basis=f"unknown: {one_line(e)}")
        out.append(est)
    return out


def measure_plan(cfg: PipelineConfig) -> dict[str, Measured]:
    """What each step's committed outputs on this root record (steps whose outputs cannot be read are left out)."""
    out = {}
    for step in plan(cfg):
        try:
            out[step.name] = _measure(_stage_config(step), step, cfg)
        except (PipelineError, OSError):
            continue
    return out


def _hours(e: StepEstimate) -> str:
    return "" if e.gpu_hours is None else "CPU" if e.gpu_hours == 0 else human_hours(e.gpu_hours)


def _rows(estimates: list[StepEstimate]) -> list[list[str]]:
    rows = []
    for e in estimates:
        basis = "; ".join(b for b in (e.basis, e.measured) if b)
        rows.append([e.step, "" if e.samples is None else human_count(e.samples),
                     "" if e.bytes is None else human_bytes(e.bytes), _hours(e), basis])
    known = [e for e in estimates if e.bytes is not None]
    unknown = len(estimates) - len(known)
    rows.append(["total", "", human_bytes(sum(e.bytes or 0 for e in known)),
                 human_hours(sum(e.gpu_hours or 0 for e in known)),
                 f"{unknown} steps unknown, not counted" if unknown else ""])
    return rows


HEADER = ["step", "samples", "bytes", "GPU-hours", "basis"]


def rates_note(rates: Rates) -> str:
    return (f"Bytes: what each step writes under the output root. GPU-hours: at bare-model rates of one {rates.card}"
            f"\n(per GPU; {rates.source}): no data loading, I/O or communication, so a lower bound.")


def estimate_text(estimates: list[StepEstimate], rates: Rates) -> str:
    """The estimate as an aligned plain-text table (`pixart status --estimate`)."""
    rows = [HEADER, *_rows(estimates)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}"
             for r in rows]
    return "\n".join(["Estimate before running. " + rates_note(rates), "", *lines])


def estimate_markdown(estimates: list[StepEstimate], rates: Rates) -> str:
    """The estimate as markdown (the `pixart-pipeline-estimate` artifact)."""
    rows = [HEADER, ["---"] * len(HEADER), *_rows(estimates)]
    return "\n".join([rates_note(rates), "", *("| " + " | ".join(r) + " |" for r in rows)])


def comparison_markdown(estimates: list[StepEstimate], measured: dict[str, Measured]) -> str:
    """Estimated next to measured, per step: samples, bytes (stored now under the output root), and GPU-hours next
    to the seconds the outputs' markers (a run's summary) record."""
    lines = ["Estimated vs measured (stored bytes and recorded seconds of each step's committed outputs):", "",
             "| step | samples est. | samples | bytes est. | bytes stored | GPU-hours est. | seconds recorded |",
             "|---|---|---|---|---|---|---|"]
    for e in estimates:
        m = measured.get(e.step, Measured())
        cells = [e.step, "" if e.samples is None else human_count(e.samples), human_count(m.samples) if m.samples
                 else "", "" if e.bytes is None else human_bytes(e.bytes), human_bytes(m.bytes) if m.outputs else "",
                 _hours(e), f"{m.seconds:.1f}" if m.seconds else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

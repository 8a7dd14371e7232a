"""The pipeline as one DAG: ingest -> caption -> extract -> stage 1 -> stage 2 (re-parameterised from stage 1) ->
stage 3's steps -> export, each step one run of an existing stage, each finding its inputs in the previous step's
committed outputs.

    cfg = load_config(PipelineConfig, "demo", ["output_root=/tmp/p"], kind="pipeline")
    steps = plan(cfg)                                  # the DAG: Step(name, kind, after, resolve)
    for step in steps: print(step.name, state(step))   # done / pending (why) / failed / waiting, nothing run
    outcome = run_pipeline(cfg, run_step)              # runs every step that is not done, in order
    outcome.ok, outcome.exit_code                      # ok: every selected step done; 3: only busy shards

Lineage decides what runs. A sharded step (ingest, caption, extract) runs its stage, which redoes only the shards
that are missing or stale for their lineage (`storage.lineage`) and skips the rest. A training run is named by its
lineage: `<step>-<hash>` of its effective config, the content ids of every feature shard it reads and the run it
starts from; a changed input or key gives a new run, trained from its own start, while an unchanged one is done
once its last checkpoint is committed. An init given as a path (an external DiT or checkpoint) counts by its content
(`init_identity`), so other weights under the same name train a new run. So a new caption prompt re-captions (a new
caption set), re-encodes the text and retrains, but keeps the manifests and latents; a new VAE re-encodes latents
and retrains; nothing upstream of a change runs. The export records the checkpoint it came from.

A run is green only when every selected step is done: a selected step whose upstream is not done (and not selected)
is reported, not silently left waiting. A step that fails is recorded under `<output_root>/pipeline/failed/` (its
message and time) until it is done, so `pixart status` says `failed` and why.

`flows/pipeline_flow.py` runs the same plan as the Prefect flow `pixart-pipeline` (each step a subflow of its
stage's flow); `pixart pipeline` and `pixart status` run it here.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.pipeline_config import PipelineConfig
from storage.errors import PipelineError

DEMO_READY = ".demo-inputs.json"  # written last under demo_inputs: the sample shards and tiny models are complete
MIB = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")  # the files of an init directory that count


class StepBusy(PipelineError):
    """A step ended with shards that another live run holds: incomplete, not failed (re-run once that run ends)."""


@dataclass
class Step:
    """One node of the DAG. `resolve()` gives (stage preset, overrides), computed when its inputs exist."""

    name: str
    kind: str  # ingest, caption, extract, train, export
    after: list[str]
    resolve: Callable[[], tuple[str, list[str]]]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepState:
    state: str  # done, pending (with why: missing, stale ...), failed (last run's message), waiting (for upstream)
    detail: str = ""


# ---------------------------------------------------------------------------------------------------------------------
# Demo inputs: sample shards from real photos and tiny models, built offline once
# ---------------------------------------------------------------------------------------------------------------------


def demo_inputs(cfg: PipelineConfig) -> PipelineConfig:
    """With `demo_inputs`: build the sample shards and the `tiny` models there once (a marker written last says they
    are complete), and fill them into empty sources and `tiny` models. A second call builds nothing, so the sources'
    sizes and mtimes, and with them every lineage, stay the same."""
    if not cfg.demo_inputs:
        return cfg
    root = Path(cfg.demo_inputs).resolve()
    ready = root / DEMO_READY
    if ready.exists():
        built = json.loads(ready.read_text())
    else:
        from captioning.tiny import make_tiny_llava, make_tiny_t5_tokenizer
        from pixart.tiny import make_tiny_t5_encoder, make_tiny_vae
        from storage.ingest.samples import build_samples

        raw = build_samples(root / "raw", short_side=768)
        t5_tok = make_tiny_t5_tokenizer(root / "models" / "tiny-t5")
        built = {"raw": {k: str(v) for k, v in raw.items()},
                 "models": {"llava": make_tiny_llava(root / "models" / "tiny-llava"), "t5_tokenizer": t5_tok,
                            "t5": make_tiny_t5_encoder(root / "models" / "tiny-t5-encoder", t5_tok),
                            "vae": make_tiny_vae(root / "models" / "tiny-vae")}}
        ready.write_text(json.dumps(built, indent=1))
    raw = built["raw"]
    sources = {"sam": {"source": raw["sam_links"]},
               "journeydb": {"source": raw["journeydb"], "annotations": raw["journeydb_annotations"]},
               "imagenet": {"source": raw["imagenet"], "synset_mapping": raw["synset_mapping"]}}
    datasets = {name: spec.model_copy(update=sources.get(name, {})) if spec.source is None else spec
                for name, spec in cfg.datasets.items()}
    models = {k: built["models"][k] if v == "tiny" else v for k, v in cfg.models.model_dump().items()}
    return cfg.model_copy(update={"datasets": datasets, "models": cfg.models.model_copy(update=models)})


# ---------------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------------


def caption_set(cfg: PipelineConfig, dataset: str) -> str:
    """The caption set the caption step of `dataset` writes (named by model, prompt and generation settings)."""
    from captioning.config import CaptionConfig
    from storage.configio import load_config

    return load_config(CaptionConfig, dataset, _caption_overrides(cfg), kind="caption").resolved_caption_set()


def _caption_overrides(cfg: PipelineConfig) -> list[str]:
    m = cfg.models
    return [f"output_root={cfg.output_root}", f"model={m.llava}", f"t5_tokenizer={m.t5_tokenizer}", *cfg.caption]


def plan(cfg: PipelineConfig) -> list[Step]:
    """Every step of the pipeline in an order that respects `after`."""
    steps: list[Step] = []
    root = f"output_root={cfg.output_root}"
    for name, spec in cfg.datasets.items():
        args = [root, *(f"{k}={v}" for k in ("source", "annotations", "synset_mapping")
                        if (v := getattr(spec, k)) is not None), *spec.overrides]
        steps.append(Step(f"ingest-{name}", "ingest", [], lambda name=name, args=args: (name, args),
                          {"dataset": name}))
    for name, spec in cfg.datasets.items():
        if spec.caption:
            steps.append(Step(f"caption-{name}", "caption", [f"ingest-{name}"],
                              lambda name=name: (name, _caption_overrides(cfg)), {"dataset": name}))
    models = [f"t5_model={cfg.models.t5}", f"vae_model={cfg.models.vae}"]
    for name, f in cfg.features.items():
        captioned = cfg.datasets[f.dataset].caption
        after = [f"ingest-{f.dataset}"] + ([f"caption-{f.dataset}"] if captioned else [])

        def resolve(f=f, captioned=captioned):
            sets = [f"caption_set={caption_set(cfg, f.dataset)}"] if captioned else []
            return f.preset, [root, *models, *sets, *f.overrides]

        steps.append(Step(f"extract-{name}", "extract", after, resolve, {"dataset": f.dataset}))
    for name, t in cfg.train.items():
        after = [f"extract-{t.features}"] + ([f"train-{t.init}"] if t.init else [])
        steps.append(Step(f"train-{name}", "train", after, lambda name=name: train_args(cfg, name), {"train": name}))
    if cfg.export:
        steps.append(Step("export", "export", [f"train-{cfg.export}"], lambda: ("", [cfg.export]), {}))
    return steps


def train_args(cfg: PipelineConfig, name: str) -> tuple[str, list[str]]:
    """The train preset and overrides of step `name`, its run named by its lineage (see the module docstring)."""
    from flows.train_stage import load_train_config
    from storage.layout import run_dir

    t = cfg.train[name]
    feature = cfg.features[t.features]
    captioned = cfg.datasets[feature.dataset].caption
    args = [f"output_root={cfg.output_root}", f"t5_model={cfg.models.t5}", f"vae_model={cfg.models.vae}",
            *([f"data.caption_set={caption_set(cfg, feature.dataset)}"] if captioned else []), *t.overrides]
    init_run = train_args(cfg, t.init)[1][-1].removeprefix("run=") if t.init else None
    probe = load_train_config(t.preset, [*args, "run=probe"])
    run = f"{name}-{_run_hash(probe, init_run)}"
    args.append(f"init={run_dir(cfg.output_root, init_run)}") if init_run else None
    return t.preset, [*args, f"run={run}"]


def _run_hash(probe, init_run: str | None) -> str:
    """Lineage of a training run: its effective config (run name, init and root aside), the content ids of every
    feature shard it reads, and the run it starts from: a pipeline step's run by name, an external init (a path in
    the step's overrides) by its content."""
    from pixart.data.index import feature_shards
    from storage.lineage import committed_identity, effective_config

    settings = {k: v for k, v in effective_config(probe).items() if k not in ("run", "init", "output_root")}
    d = probe.data
    shards = feature_shards(probe.output_root, d.dataset, d.base_size, d.multi_scale, d.caption_set)
    ids = [[s.name, committed_identity(s.latents), committed_identity(s.text) if s.text else None] for s in shards]
    lineage = {"settings": settings, "features": ids, "init": init_run}
    if probe.init and not init_run:  # only then: the names of runs without an external init stay as they were
        lineage["init_content"] = init_identity(probe.init)
    blob = json.dumps(lineage, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def init_identity(init: str) -> str:
    """What an external init is, by content: for a file its size and the sha256 of its first and last MiB; for a
    directory the same over its config.json and weight files (sorted by relative path); else (a hub id) its name.
    A copy or a move keeps it (no mtime, no path); other weights under the same path change it."""
    from storage.urls import filesystem

    fs, path = filesystem(init)
    path = path.rstrip("/")
    if fs.isfile(path):
        return "file:" + _file_identity(fs, path)
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path)
                       if p.rsplit("/", 1)[-1] == "config.json" or p.endswith(WEIGHT_SUFFIXES))
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p[len(path):].lstrip('/')}\0{_file_identity(fs, p)}\n".encode())
        return f"dir:{len(files)}:{h.hexdigest()}"
    return "id:" + init


def _file_identity(fs, path: str) -> str:
    size = int(fs.size(path))
    h = hashlib.sha256(f"{size}\0".encode())
    with fs.open(path, "rb") as f:
        h.update(f.read(MIB))
        if size > MIB:
            f.seek(max(MIB, size - MIB))
            h.update(f.read(MIB))
    return f"{size}:{h.hexdigest()}"


# ---------------------------------------------------------------------------------------------------------------------
# State: what a step would do now, without doing it
# ---------------------------------------------------------------------------------------------------------------------


def stage_of(kind: str):
    if kind == "ingest":
        from flows.ingest_stage import IngestStage

        return IngestStage()
    if kind == "caption":
        from flows.caption_stage import CaptionStage

        return CaptionStage()
    if kind == "extract":
        from flows.extract_stage import ExtractStage

        return ExtractStage()
    if kind == "train":
        from flows.train_stage import TrainStage

        return TrainStage()
    raise ValueError(kind)


def state(cfg: PipelineConfig, step: Step, done: set[str]) -> StepState:
    """done, pending (and why), failed (a pipeline run's last try of it failed, and it is not done), or waiting for
    an upstream step; reads only markers, indexes, sources and the failure records."""
    waiting = [a for a in step.after if a not in done]
    if waiting:
        return StepState("waiting", f"after {', '.join(waiting)}")
    now = _state(cfg, step)
    if now.state != "done" and (failure := read_failure(cfg, step.name)) is not None:
        return StepState("failed", f"{failure.get('message')} (at {failure.get('at')}; now: {now.detail})")
    return now


def _state(cfg: PipelineConfig, step: Step) -> StepState:
    try:
        preset, args = step.resolve()
        if step.kind == "train":
            return _train_state(cfg, preset, args)
        if step.kind == "export":
            return _export_state(cfg, args[0])
        stage = stage_of(step.kind)
        stage_cfg = stage.load(preset, args)
        pending = stage.shards(stage_cfg, lambda message: None)
    except PipelineError as e:
        return StepState("pending", str(e))
    finally:
        if "stage" in locals():
            stage.close()
    total = len(pending) + stage.committed_before
    if not pending:
        return StepState("done", f"{total} shards current")
    whys = sorted({s.why for s in pending if s.why})
    return StepState("pending", f"{len(pending)} of {total} shards to do ({'; '.join(whys[:2]) or 'pending'})")


# ---------------------------------------------------------------------------------------------------------------------
# Failure records: <output_root>/pipeline/failed/<step>.json, kept until the step is done
# ---------------------------------------------------------------------------------------------------------------------


def failure_url(cfg: PipelineConfig, step: str) -> str:
    from storage.urls import join

    return join(cfg.output_root, "pipeline", "failed", f"{step}.json")


def read_failure(cfg: PipelineConfig, step: str) -> dict[str, Any] | None:
    """The last failure of `step` a pipeline run recorded, or None (also when the record cannot be read)."""
    from storage.urls import exists, read_text

    url = failure_url(cfg, step)
    try:
        return json.loads(read_text(url)) if exists(url) else None
    except (OSError, ValueError, PipelineError):
        return None


def record_failure(cfg: PipelineConfig, step: str, message: str) -> None:
    from storage.commit import write_atomic

    at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_atomic(failure_url(cfg, step), json.dumps({"step": step, "message": message, "at": at}).encode())


def clear_failure(cfg: PipelineConfig, step: str) -> None:
    from storage.urls import filesystem

    fs, path = filesystem(failure_url(cfg, step))
    if fs.exists(path):
        fs.rm(path)


def _train_state(cfg: PipelineConfig, preset: str, args: list[str]) -> StepState:
    from flows.train_stage import load_train_config
    from pixart.train import checkpoint

    run = args[-1].removeprefix("run=")
    steps = [s for s, _ in checkpoint.list_checkpoints(cfg.output_root, run)]
    target = load_train_config(preset, args).schedule.max_steps
    if steps and max(steps) >= target:
        return StepState("done", f"run {run}: {max(steps)} steps")
    others = _other_runs(cfg, run)
    why = f"inputs or config changed since {others[-1]}" if others and not steps else "not trained yet"
    return StepState("pending", f"run {run}: {max(steps) if steps else 0}/{target} steps ({why})")


def _other_runs(cfg: PipelineConfig, run: str) -> list[str]:
    from storage.layout import run_dir
    from storage.urls import filesystem

    prefix = run.rsplit("-", 1)[0] + "-"
    fs, path = filesystem(run_dir(cfg.output_root, run).rsplit("/", 1)[0])
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix) and n != run and "." not in n)


def export_dir(cfg: PipelineConfig) -> str:
    from storage.urls import join

    return join(cfg.output_root, "export")


def _export_state(cfg: PipelineConfig, train_step: str) -> StepState:
    from pixart.export import EXPORT_INFO
    from pixart.train import checkpoint

    run = train_args(cfg, train_step)[1][-1].removeprefix("run=")
    latest = checkpoint.latest(cfg.output_root, run)
    if latest is None:
        return StepState("pending", f"run {run} has no checkpoint")
    try:
        info = json.loads((Path(export_dir(cfg)) / EXPORT_INFO).read_text())
    except (OSError, ValueError):
        info = None
    step = max(s for s, _ in checkpoint.list_checkpoints(cfg.output_root, run))
    if info is not None and (info.get("run"), info.get("step")) == (run, step):  # by run and step, not by path
        return StepState("done", f"{export_dir(cfg)} from {latest}")
    return StepState("pending", "not exported yet" if info is None else f"exported from {info.get('source')}")


# ---------------------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PipelineOutcome:
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per step: the summary table
    failed: dict[str, str] = field(default_factory=dict)  # every selected step not done, with why (below)
    busy: set[str] = field(default_factory=set)  # of those: shards that another live run holds (incomplete)
    waiting: set[str] = field(default_factory=set)  # of those: not started, an upstream step not done
    on_busy: set[str] = field(default_factory=set)  # steps not done only because of busy shards (theirs or upstream)

    @property
    def ok(self) -> bool:
        """Everything the run was asked to do is done."""
        return not self.failed

    @property
    def exit_code(self) -> int:
        """0 done; 3 incomplete: only shards that another live run holds are not done (re-run once it ends); 1 a
        step failed, or a selected step could not run."""
        if self.ok:
            return 0
        return 3 if set(self.failed) <= self.on_busy else 1

    def message(self) -> str:
        """One line naming every step not done and why (busy shards by name)."""
        steps = "; ".join(f"{step}: {why.removeprefix('incomplete: ')}" for step, why in self.failed.items())
        return f"incomplete: {steps} (re-run once that run ends)" if self.exit_code == 3 else f"failed: {steps}"

    def label(self, step: str) -> str:
        return "INCOMPLETE" if step in self.on_busy else "NOT RUN" if step in self.waiting else "FAILED"


def selected(cfg: PipelineConfig, step: Step) -> bool:
    return (step.name in cfg.only) if cfg.only else step.kind in cfg.steps


def run_pipeline(cfg: PipelineConfig, run_step: Callable[[Step, str, list[str]], dict[str, Any]],
                 log: Callable[[str], None] = print) -> PipelineOutcome:
    """Run, in order, every selected step that is not done; a step whose upstream failed or is not done is not
    started, and if it was selected the outcome is not ok (it says what the step waits for). `run_step(step,
    preset, overrides)` runs one stage and returns its counts (raising PipelineError on failure, StepBusy when
    only shards busy in another run are left); the caller decides where (here, or as a Prefect subflow). A step
    that fails is recorded under the output root (`pixart status` shows it) until it is done."""
    outcome = PipelineOutcome()
    steps = plan(cfg)
    by_name = {step.name: step for step in steps}
    done: set[str] = set()
    for step in steps:
        start = time.perf_counter()
        before = state(cfg, step, done)
        row = {"step": step.name, "state": before.state, "detail": before.detail}
        if before.state == "done":
            done.add(step.name)
            row["state"] = "skipped"
            log(f"{step.name}: skipped, nothing changed ({before.detail})")
            _forget_failure(cfg, step.name, log)
        elif before.state == "waiting" or not selected(cfg, step):
            row["state"] = "not run" if before.state != "waiting" else "waiting"
            if before.state == "waiting" and selected(cfg, step):
                ups = [a for a in step.after if a not in done]
                why = _why_waiting(cfg, ups, by_name)
                outcome.failed[step.name] = why
                outcome.waiting.add(step.name)
                if all(u in outcome.on_busy for u in ups):
                    outcome.on_busy.add(step.name)
                row["detail"] = why
                log(f"{step.name}: NOT RUN: {why}")
            else:
                log(f"{step.name}: {row['state']} ({before.detail})")
        else:
            log(f"{step.name}: running ({before.detail})")
            try:
                preset, args = step.resolve()
                row.update(run_step(step, preset, args))
            except StepBusy as e:
                outcome.failed[step.name] = str(e)
                outcome.busy.add(step.name)
                outcome.on_busy.add(step.name)
                row.update(state="incomplete", detail=str(e))
                log(f"{step.name}: INCOMPLETE: {e}")
            except PipelineError as e:
                outcome.failed[step.name] = str(e)
                row.update(state="failed", detail=str(e))
                log(f"{step.name}: FAILED: {e}")
                try:
                    record_failure(cfg, step.name, str(e))
                except (OSError, PipelineError) as err:  # e.g. the output root itself is what failed
                    log(f"{step.name}: could not record the failure under {cfg.output_root}: {err}")
            else:
                done.add(step.name)
                row["state"] = "done"
                _forget_failure(cfg, step.name, log)
        row["seconds"] = round(time.perf_counter() - start, 1)
        outcome.rows.append(row)
    return outcome


def _why_waiting(cfg: PipelineConfig, ups: list[str], by_name: dict[str, Step]) -> str:
    left_out = [u for u in ups if not selected(cfg, by_name[u])]
    unfinished = [u for u in ups if u not in left_out]
    parts = []
    if left_out:
        how = "only= leaves " + ("it" if len(left_out) == 1 else "them") + " out" if cfg.only else \
            f"steps= leaves out {', '.join(sorted({by_name[u].kind for u in left_out}))}"
        parts.append(f"{', '.join(left_out)}, not done and not selected ({how})")
    if unfinished:
        parts.append(f"{', '.join(unfinished)}, not done in this run")
    return "not run: it waits for " + "; and for ".join(parts)


def _forget_failure(cfg: PipelineConfig, step: str, log: Callable[[str], None]) -> None:
    try:
        clear_failure(cfg, step)
    except (OSError, PipelineError) as err:
        log(f"{step}: could not remove its failure record under {cfg.output_root}: {err}")


def counted(c: dict[str, Any]) -> dict[str, Any]:
    """A stage's counts (`StageOutcome.counts()`, or what its flow returned) as summary columns: samples, errors,
    and for extract the features ("8 text, 8 latents"), its images counted once, not text and latent rows summed."""
    kinds = c.get("ok_by_kind") or {}
    row = {"samples": kinds.get("latents", kinds.get("text", 0)) if kinds else c.get("num_ok"),
           "errors": c.get("num_error")}
    if kinds:
        from flows.extract_stage import feature_counts

        row["features"] = feature_counts(kinds)
    return row


def summary_row(step: Step, outcome) -> dict[str, Any]:
    """A step's line of the summary table, from its stage's outcome."""
    c = outcome.counts()
    row = {**counted(c), "shards": f"{c['to_run']} run, {c['committed']} current",
           "bytes": sum(r.get("bytes") or 0 for r in outcome.results if not r.get("skipped"))}
    if "buckets" in outcome.extra:
        row["buckets"] = outcome.extra["buckets"]
    if step.kind == "train":
        row.update(loss=outcome.extra.get("final_loss"), steps=outcome.extra.get("steps"),
                   run=outcome.results[0].get("output_url") if outcome.results else None)
    return row


def local_runner(cfg: PipelineConfig) -> Callable[[Step, str, list[str]], dict[str, Any]]:
    """Steps run in this process (`pixart pipeline`): each stage through the kit's local runtime, or the export."""
    from flows._stage import LocalRuntime, run_stage

    def run_step(step: Step, preset: str, args: list[str]) -> dict[str, Any]:
        if step.kind == "export":
            return export_step(cfg, args[0])
        outcome = run_stage(stage_of(step.kind), preset, args, False, LocalRuntime())
        if not outcome.ok:
            message = outcome.extra.get("message") or "incomplete"
            raise StepBusy(message) if outcome.busy and not outcome.failed else PipelineError(message)
        return summary_row(step, outcome)

    return run_step


def export_step(cfg: PipelineConfig, train_step: str) -> dict[str, Any]:
    """Export the latest checkpoint of `train_step`'s run as a diffusers pipeline under `<output_root>/export`."""
    from pixart.export import export
    from pixart.train import checkpoint

    run = train_args(cfg, train_step)[1][-1].removeprefix("run=")
    latest = checkpoint.latest(cfg.output_root, run)
    if latest is None:
        raise PipelineError(f"export: run {run} has no committed checkpoint")
    out = export(latest, export_dir(cfg), force=True)
    return {"export": out, "from": latest}


COLUMNS = ("step", "state", "samples", "errors", "buckets", "loss", "seconds", "bytes")


def summary_table(outcome: PipelineOutcome, cfg: PipelineConfig, stored: dict[str, int] | None = None) -> str:
    """The run as a markdown table: per step its state, samples, errors, buckets, final loss, time and bytes; then
    the export's path. `stored`: the bytes each step's committed outputs take (`pipeline_cost.measure_plan`), which
    the bytes column then shows for every step alike (otherwise: what this run's shards report)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in outcome.rows:
        cells = []
        for c in COLUMNS:
            v = stored.get(row["step"]) if c == "bytes" and stored is not None else row.get(c)
            cells.append("" if v is None else f"{v:.4f}" if c == "loss" else _size(v) if c == "bytes" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    export = next((r.get("export") for r in outcome.rows if r.get("export")), None)
    skipped = sum(r["state"] == "skipped" for r in outcome.rows)
    if skipped:
        lines += ["", f"{skipped} of {len(outcome.rows)} steps skipped: nothing they depend on changed."]
    lines += ["", f"diffusers export: {export or export_dir(cfg) if cfg.export else 'none'}"]
    if outcome.failed:
        lines += [f"{outcome.label(name)} {name}: {why}" for name, why in outcome.failed.items()]
    return "\n".join(line for line in lines if line is not None)


def _size(n: Any) -> str:
    n = float(n or 0)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)

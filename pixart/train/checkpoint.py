"""Training checkpoints: one self-describing directory per step, published atomically, the oldest pruned.

    runs/<run>/checkpoints/step-000001000/
        transformer/         the model, diffusers format (safetensors): from_pretrained() loads it
        ema/                 the EMA weights, same format (when the stage keeps an EMA)
        optimizer.pt         AdamW state, a plain tensor dict: read back with torch.load(weights_only=True)
        trainer.json         step, stage, epoch, lr schedule, loader state, RNG seed, GPU-hours so far, config hash,
                             the content ids of the feature shards read
        config.yaml          the resolved training config
    runs/<run>/checkpoints/step-000001000.done   written last: only then does the checkpoint exist

Who writes each part: `save_state` / `load_state` walk the trainer's state providers (`StateProvider`: model, EMA,
optimizer, data position, RNG, step, config; pixart/train/state.py), each writing its files and its entries of
trainer.json, each checking and reading them back.

A crash while saving leaves a temporary directory, or a published `step-N/` with no marker, so `latest()` never
picks a half-written checkpoint; `sweep_temporaries` removes such leftovers when the next run of the name starts
(under the run's lease, so none of them can be another live run's), and a save of step N replaces an unmarked
`step-N/` rather than keep it (its weights may be a killed run's, under another config). On object stores the
directory is written locally first and uploaded before the marker. A save that fails (a full disk) and a file that
cannot be read back (a corrupt marker, a pickled optimizer state) are `CheckpointError`s that name the file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from storage.commit import DONE_SUFFIX, TMP_MARK, is_done, publish_dir_once, read_done, write_done
from storage.errors import PipelineError, is_transient, one_line
from storage.layout import CHECKPOINTS, checkpoint_url, checkpoints_dir, run_dir
from storage.urls import filesystem, join, protocol_of

TRAINER_STATE = "trainer.json"


class CheckpointError(PipelineError):
    """A checkpoint that could not be written or read back; the message names the file."""


def list_checkpoints(root: str, run: str) -> list[tuple[int, str]]:
    """Committed checkpoints of a run as (step, url), oldest first."""
    return [(step, checkpoint_url(root, run, step)) for step, _ in run_checkpoints(run_dir(root, run))]


def run_checkpoints(run_url: str) -> list[tuple[int, str]]:
    """Committed checkpoints under a run directory (`<root>/runs/<run>`, or a copy of one anywhere) as (step, url),
    oldest first."""
    url = join(run_url.rstrip("/"), CHECKPOINTS)
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    out = []
    for p in fs.ls(path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("step-") and name.endswith(DONE_SUFFIX):
            out.append((int(name[len("step-"):-len(DONE_SUFFIX)]), join(url, name[:-len(DONE_SUFFIX)])))
    return sorted(out)


def latest(root: str, run: str) -> str | None:
    found = list_checkpoints(root, run)
    return found[-1][1] if found else None


def save(root: str, run: str, step: int, write: Callable[[Path], dict[str, Any]], keep: int) -> str:
    """Publish checkpoint `step`: `write(local_dir)` fills a directory and returns the trainer state, stored as
    trainer.json and in the marker. Then all but the newest `keep` checkpoints are deleted (marker first). An
    OSError on the way (a full disk) is a CheckpointError naming the checkpoint; the previous checkpoint stays the
    latest."""
    url = checkpoint_url(root, run, step)
    if is_done(url):
        return url  # a second copy of this run got here first: the step's checkpoint is the same
    try:
        with publish_dir_once(url, replace_unmarked=True) as (fs, tmp):  # never a killed save's folder
            if protocol_of(fs) in ("file", "local"):
                state = write(Path(tmp))
                (Path(tmp) / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
            else:
                with tempfile.TemporaryDirectory(prefix="pixart-ckpt-") as local:
                    state = write(Path(local))
                    (Path(local) / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
                    fs.put(local.rstrip("/") + "/", tmp, recursive=True)
        write_done(url, state)
    except OSError as e:
        previous = latest(root, run)
        then = (f"the last committed checkpoint, {previous.rsplit('/', 1)[-1]}, is kept and a re-run resumes from it"
                if previous else "no checkpoint of the run is committed yet: a re-run starts from the beginning")
        err = CheckpointError(f"checkpoint {url} could not be written ({_reason(e)}); {then}")
        err.transient = is_transient(e)
        raise err from e
    for _, old in list_checkpoints(root, run)[:-keep]:
        delete(old)
    return url


def _reason(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or one_line(e)}{where}"


def delete(url: str) -> None:
    """Marker first, so the checkpoint stops existing before its files go; a checkpoint already gone is fine."""
    fs, path = filesystem(url)
    try:
        fs.rm(path + DONE_SUFFIX)
    except FileNotFoundError:
        pass
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def sweep_temporaries(root: str, run: str) -> list[str]:
    """Delete every checkpoint temporary of the run (`step-N.tmp-*`, `step-N.done.tmp-*`) and every step folder
    without its done marker (`step-N/`, published by a save killed before its marker), whatever their age: only a
    save killed half-way leaves one. Call it only while holding the run's lease (no other live run can be writing
    one). Returns what was deleted."""
    fs, path = filesystem(checkpoints_dir(root, run))
    if not fs.exists(path):
        return []
    listed = {p.rstrip("/").rsplit("/", 1)[-1]: p for p in fs.ls(path, detail=False)}
    marked = {name[:-len(DONE_SUFFIX)] for name in listed if name.endswith(DONE_SUFFIX)}
    gone = []
    for name, p in listed.items():
        unmarked = TMP_MARK not in name and not name.endswith(DONE_SUFFIX) and name not in marked
        if name.startswith("step-") and (TMP_MARK in name or unmarked):
            try:
                fs.rm(p, recursive=True)
            except FileNotFoundError:
                continue
            gone.append(name)
    return sorted(gone)


def trainer_state(url: str) -> dict[str, Any]:
    try:
        state = read_done(url)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{url}{DONE_SUFFIX}: not a readable checkpoint marker ({one_line(e)})") from None
    if state is None:
        raise FileNotFoundError(f"{url} is not a committed checkpoint (no {DONE_SUFFIX} marker)")
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{url}{DONE_SUFFIX}: not a checkpoint marker (no step)")
    return state


def local_copy(url: str) -> tuple[str, Callable[[], None]]:
    """A local directory holding the checkpoint (itself when local), and a cleanup function."""
    fs, path = filesystem(url)
    if protocol_of(fs) in ("file", "local"):
        return path, lambda: None
    local = tempfile.mkdtemp(prefix="pixart-ckpt-")
    fs.get(path.rstrip("/") + "/", local + "/", recursive=True)
    return local, lambda: shutil.rmtree(local, ignore_errors=True)


def save_optimizer(state: dict[str, Any], path: Path) -> None:
    """An optimizer state dict (by index under DDP, by parameter name under FSDP) as `optimizer.pt`."""
    torch.save(state, path / "optimizer.pt")


def read_optimizer(path: Path, device: torch.device | str) -> dict[str, Any]:
    """The optimizer state, read with weights_only=True (never unpickled: a pickled object is refused); anything
    but a plain tensor state dict is a CheckpointError naming the file."""
    file = path / "optimizer.pt"
    try:
        state = torch.load(file, map_location=device, weights_only=True)  # never unpickle
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing from the checkpoint") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError, a torn zip (RuntimeError), EOFError: all say "bad file"
        raise CheckpointError(f"{file}: not a plain optimizer state, refused without unpickling it "
                              f"({one_line(e)[:300]})") from None
    if not isinstance(state, dict) or not {"state", "param_groups"} <= state.keys():
        raise CheckpointError(f"{file}: not an optimizer state dict (no state and param_groups)")
    return state


# ---------------------------------------------------------------------------------------------------------------------
# State providers: what a checkpoint holds, walked in order
# ---------------------------------------------------------------------------------------------------------------------


class StateProvider:
    """One piece of a trainer's state. A save calls `gather` on every rank (FSDP's collectives happen there), then
    `write` on rank 0 with what was gathered: its files under the directory, and its entries of trainer.json. A
    resume calls every provider's `check` before anything is read, then `read`, in order."""

    def gather(self) -> Any:
        return None

    def write(self, gathered: Any, directory: Path) -> dict[str, Any]:
        return {}

    def check(self, state: dict[str, Any], url: str) -> None:
        """Refuse a checkpoint (`state`: its trainer.json) this run cannot continue; the message says why."""

    def read(self, directory: Path, state: dict[str, Any]) -> None:
        pass


def save_state(root: str, run: str, step: int, providers: dict[str, StateProvider], rank: int,
               keep: int) -> str | None:
    """Checkpoint `step` from `providers`: every rank gathers, rank 0 writes and publishes (`save`); None on other
    ranks."""
    gathered = {name: provider.gather() for name, provider in providers.items()}
    if rank != 0:
        return None

    def write(directory: Path) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for name, provider in providers.items():
            state.update(provider.write(gathered[name], directory))
        return state

    return save(root, run, step, write, keep)


def load_state(url: str, providers: dict[str, StateProvider]) -> dict[str, Any]:
    """Resume `providers` from checkpoint `url`: all checks first (nothing is downloaded or loaded for a checkpoint
    that is refused), then each reads its part; returns the checkpoint's trainer state."""
    state = trainer_state(url)
    for provider in providers.values():
        provider.check(state, url)
    local, cleanup = local_copy(url)
    try:
        for provider in providers.values():
            provider.read(Path(local), state)
    finally:
        cleanup()
    return state

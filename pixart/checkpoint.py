"""Training checkpoints: one self-describing directory per step, published atomically, the oldest pruned.

    runs/<run>/checkpoints/step-000001000/
        transformer/         the model, diffusers format (safetensors): from_pretrained() loads it
        ema/                 the EMA weights, same format (when the stage keeps an EMA)
        optimizer.pt         AdamW state, a plain tensor dict: read back with torch.load(weights_only=True)
        trainer.json         step, epoch, lr schedule, loader state, GPU-hours so far, config hash
        config.yaml          the resolved training config
    runs/<run>/checkpoints/step-000001000.done   written last: only then does the checkpoint exist

A crash while saving leaves a temporary directory and no marker, so `latest()` never picks a half-written
checkpoint. On object stores the directory is written locally first and uploaded before the marker.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from storage.commit import DONE_SUFFIX, is_done, publish_dir_once, read_done, write_done
from storage.layout import checkpoint_url, run_dir
from storage.urls import filesystem, join, protocol_of

TRAINER_STATE = "trainer.json"


def list_checkpoints(root: str, run: str) -> list[tuple[int, str]]:
    """Committed checkpoints of a run as (step, url), oldest first."""
    fs, path = filesystem(join(run_dir(root, run), "checkpoints"))
    if not fs.exists(path):
        return []
    out = []
    for p in fs.ls(path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("step-") and name.endswith(DONE_SUFFIX):
            step = int(name[len("step-"):-len(DONE_SUFFIX)])
            out.append((step, checkpoint_url(root, run, step)))
    return sorted(out)


def latest(root: str, run: str) -> str | None:
    found = list_checkpoints(root, run)
    return found[-1][1] if found else None


def save(root: str, run: str, step: int, write: Callable[[Path], dict[str, Any]], keep: int) -> str:
    """Publish checkpoint `step`: `write(local_dir)` fills a directory and returns the trainer state, stored as
    trainer.json and in the marker. Then all but the newest `keep` checkpoints are deleted (marker first)."""
    url = checkpoint_url(root, run, step)
    if is_done(url):
        return url  # a second copy of this run got here first: the step's checkpoint is the same
    with publish_dir_once(url) as (fs, tmp):
        if protocol_of(fs) in ("file", "local"):
            state = write(Path(tmp))
            (Path(tmp) / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
        else:
            with tempfile.TemporaryDirectory(prefix="pixart-ckpt-") as local:
                state = write(Path(local))
                (Path(local) / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
                fs.put(local.rstrip("/") + "/", tmp, recursive=True)
    write_done(url, state)
    for _, old in list_checkpoints(root, run)[:-keep]:
        delete(old)
    return url


def delete(url: str) -> None:
    fs, path = filesystem(url)
    fs.rm(path + DONE_SUFFIX)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def trainer_state(url: str) -> dict[str, Any]:
    state = read_done(url)
    if state is None:
        raise FileNotFoundError(f"{url} is not a committed checkpoint (no {DONE_SUFFIX} marker)")
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
    return torch.load(path / "optimizer.pt", map_location=device, weights_only=True)  # never unpickle

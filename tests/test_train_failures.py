"""Training's failure paths on tiny models, on CPU: a crash next to a checkpoint commit, a resume with changed
hyperparameters, runs that cannot start, two runs of one name, leaked temporaries, a full disk, a NaN loss, kill -9
at a checkpoint's edges (hostile or broken stored files: tests/test_train_corrupt.py).
Every failure is injected at a known point (monkeypatch), never by timing."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch

from flows.train_stage import run_training
from pixart.data.loader import batches_per_rank
from pixart.train import checkpoint
from pixart.train.prepare import prepare_run
from pixart.train.trainer import Trainer
from storage.errors import ConfigError, PipelineError
from storage.layout import run_dir
from tests.test_train import config
from tests.train_cli import WEIGHTS, assert_one_error_line, train_cli


class Killed(BaseException):
    """Stands in for kill -9: nothing in the trainer may catch it or clean up after it."""


def metric_steps(root: str, run: str) -> list[int]:
    path = Path(run_dir(root, run)) / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def metric_losses(root: str, run: str) -> dict[int, float]:
    path = Path(run_dir(root, run)) / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def crash_at_commit(monkeypatch, step: int, after: bool) -> None:
    """Make the checkpoint of `step` die right after (or right before) its done marker is written."""
    real = checkpoint.write_done

    def write_done(url, state):
        if state["step"] == step and not after:
            raise Killed(f"killed before committing step {step}")
        real(url, state)
        if state["step"] == step and after:
            raise Killed(f"killed after committing step {step}")

    monkeypatch.setattr(checkpoint, "write_done", write_done)


# -- 7: metrics flushed before the checkpoint is committed ------------------------------------------------------------


def test_metrics_survive_a_kill_next_to_a_checkpoint_commit(features, tiny_t5_encoder, tiny_vae, monkeypatch):
    clean = config(features, "tiny-stage2", "metrics-clean", t5=tiny_t5_encoder, vae=tiny_vae)
    run_training(clean, log=lambda m: None)
    want = metric_losses(features, "metrics-clean")
    assert sorted(want) == [1, 2, 3, 4]

    cfg = config(features, "tiny-stage2", "metrics-kill", "data.prefetch=2", t5=tiny_t5_encoder, vae=tiny_vae)
    with monkeypatch.context() as m:
        crash_at_commit(m, 2, after=True)
        with pytest.raises(Killed):
            run_training(cfg, log=lambda m: None)
    assert checkpoint.latest(features, "metrics-kill").endswith("step-000000002")
    assert metric_steps(features, "metrics-kill") == [1, 2]  # the committed steps are logged

    with monkeypatch.context() as m:
        crash_at_commit(m, 4, after=False)  # logged steps 3-4, but their checkpoint never committed
        with pytest.raises(Killed):
            run_training(cfg, log=lambda m: None)
    assert checkpoint.latest(features, "metrics-kill").endswith("step-000000002")
    run_training(cfg, log=lambda m: None)  # resumes at 2: steps 3-4 are redone, logged once
    assert metric_steps(features, "metrics-kill") == [1, 2, 3, 4]
    assert metric_losses(features, "metrics-kill") == want


# -- 8: a changed lr is applied and recorded; a changed seed is refused ----------------------------------------------


def test_a_resume_applies_a_changed_lr_and_records_it(features, tiny_t5_encoder):
    first = config(features, "tiny-stage2", "lr-change", "schedule.max_steps=2", t5=tiny_t5_encoder)
    prepare_run(first)
    list(Trainer(first).fit())
    assert checkpoint.trainer_state(checkpoint.latest(features, "lr-change"))["lr"] == 1e-3

    lower = config(features, "tiny-stage2", "lr-change", "optim.lr=1e-4", "optim.weight_decay=0.1",
                   t5=tiny_t5_encoder)
    trainer = Trainer(lower)
    said: list[str] = []
    assert trainer.resume(log=said.append) and trainer.step == 2
    assert any("optim.lr" in s and "0.001" in s and "0.0001" in s for s in said), said
    assert any("optim.weight_decay" in s for s in said), said
    metrics = list(trainer.fit())
    assert [m["lr"] for m in metrics] == pytest.approx([1e-4, 1e-4], rel=1e-9)  # past the 2 warm-up steps
    assert all(g["lr"] == pytest.approx(1e-4) and g["weight_decay"] == 0.1 for g in trainer.optimizer.param_groups)
    state = checkpoint.trainer_state(checkpoint.latest(features, "lr-change"))
    assert state["step"] == 4 and state["lr"] == pytest.approx(1e-4)
    assert state["optimizer"]["lr"] == pytest.approx(1e-4) and state["optimizer"]["weight_decay"] == 0.1
    assert state["changes"] == [{"step": 2, "key": "optim.lr", "was": 1e-3, "now": 1e-4},
                                {"step": 2, "key": "optim.weight_decay", "was": 0.03, "now": 0.1}]


def test_a_resume_with_another_data_seed_is_refused(features, tiny_t5_encoder):
    cfg = config(features, "tiny-stage2", "seed-change", "schedule.max_steps=2", t5=tiny_t5_encoder)
    prepare_run(cfg)
    list(Trainer(cfg).fit())
    other = config(features, "tiny-stage2", "seed-change", "data.seed=7", t5=tiny_t5_encoder)
    with pytest.raises(PipelineError, match=r"data.seed=0.*this run has 7"):
        Trainer(other).resume()


# -- 9 and 15: a run that cannot start is refused before anything is built or written ---------------------------------


def test_stage1_on_features_without_class_labels_is_refused_before_building(features):
    cfg = config(features, "tiny-stage1", "no-labels", "data.dataset=sam")
    with pytest.raises(ConfigError, match=r"features/sam at 256: .*class label"):
        prepare_run(cfg)
    assert not Path(run_dir(features, "no-labels")).exists()


def test_a_run_that_cannot_start_writes_nothing(features, tiny_t5_encoder, tmp_path):
    from pixart.models import ModelConfig, build_pixart

    other = tmp_path / "other"
    build_pixart(ModelConfig(preset="pixart-tiny"), 256, caption_channels=16).save_pretrained(other)
    torn = tmp_path / "torn"
    build_pixart(ModelConfig(preset="pixart-tiny"), 256, caption_channels=32).save_pretrained(torn)
    weights = torn / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:200])  # header cut short
    cases = {
        "nowhere": ([f"init={tmp_path / 'nowhere'}"], "does not exist"),
        "mismatch": ([f"init={other}"], "caption_channels: expected 32, found 16"),
        "torn": ([f"init={torn}"], str(weights)),
        "huge-batch": (["data.batch_size=64"], "no full batch of 64"),
        "no-captions": (["data.caption_set=nothing"], "run pixart extract first"),
    }
    for name, (extra, message) in cases.items():
        cfg = config(features, "tiny-stage2", f"cannot-start-{name}", *extra, t5=tiny_t5_encoder)
        with pytest.raises(PipelineError) as e:
            run_training(cfg, log=lambda m: None)
        assert message in str(e.value), (name, str(e.value))
        leftovers = sorted(p.name for p in Path(run_dir(features, cfg.run)).parent.glob(f"{cfg.run}*"))
        assert leftovers == [], (name, leftovers)  # no config.yaml, no conditions, no lease


# -- 10 and 11: one run per name at a time; its crashed checkpoint temporaries are swept ------------------------------


def test_a_second_run_of_the_same_name_is_refused_naming_it(features, tiny_t5_encoder, tiny_vae):
    from storage.lease import Lease

    cfg = config(features, "tiny-stage2", "twice", "schedule.max_steps=1", t5=tiny_t5_encoder, vae=tiny_vae)
    with Lease(run_dir(features, "twice")):  # the other run, alive
        with pytest.raises(PipelineError, match="run twice is running in another process"):
            run_training(cfg, log=lambda m: None)
        assert not Path(run_dir(features, "twice")).exists()
    assert run_training(cfg, log=lambda m: None)["steps"] == 1  # once it is gone


def test_checkpoint_temporaries_of_a_killed_save_are_swept_when_a_run_starts(features, tiny_t5_encoder, tiny_vae):
    cfg = config(features, "tiny-stage2", "leaky", "schedule.max_steps=2", t5=tiny_t5_encoder, vae=tiny_vae)
    ckpts = Path(run_dir(features, "leaky")) / "checkpoints"
    torn = ckpts / "step-000000003.tmp-0badc0de"  # a save killed half-way (a step this run never saves again)
    (torn / "transformer").mkdir(parents=True)
    (torn / "transformer" / WEIGHTS).write_bytes(b"\0" * 4096)
    (ckpts / "step-000000003.done.tmp-0badc0de").write_text("{")
    run_training(cfg, log=lambda m: None)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000000002", "step-000000002.done"]


def test_an_unmarked_step_folder_of_a_killed_save_is_replaced_never_kept(features, tiny_t5_encoder, tiny_vae):
    """A save killed after publishing step-N/ and before its marker: the next save of step N under a changed lr
    commits its own weights and trainer.json, not the killed run's; a run start sweeps such folders."""
    import shutil

    from safetensors.torch import load_file

    first = config(features, "tiny-stage2", "unmarked", "schedule.max_steps=2", t5=tiny_t5_encoder, vae=tiny_vae)
    prepare_run(first)
    list(Trainer(first).fit())
    ckpts = Path(run_dir(features, "unmarked")) / "checkpoints"
    planted = ckpts / "step-000000004"  # the killed run's step 4: its step-2 weights, its lr, no marker
    shutil.copytree(ckpts / "step-000000002", planted)

    lower = config(features, "tiny-stage2", "unmarked", "optim.lr=1e-4", t5=tiny_t5_encoder, vae=tiny_vae)
    trainer = Trainer(lower)  # no run start here: the save itself must not keep the planted folder
    assert trainer.resume() and trainer.step == 2
    list(trainer.fit())
    assert checkpoint.latest(features, "unmarked") == str(planted)
    state = json.loads((planted / "trainer.json").read_text())
    assert state["step"] == 4 and state["lr"] == pytest.approx(1e-4)
    assert state == checkpoint.trainer_state(str(planted))  # the folder is the one its marker describes
    for part, model in (("transformer", trainer.model), ("ema", trainer.ema)):
        saved, now = load_file(planted / part / WEIGHTS), model.state_dict()
        assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved), part

    stray = ckpts / "step-000000006"  # another killed save's published, unmarked folder
    shutil.copytree(ckpts / "step-000000002", stray)
    run_training(lower, log=lambda m: None)  # at max_steps already: only the run start's sweep touches it
    assert not stray.exists() and checkpoint.latest(features, "unmarked") == str(planted)


# -- 12: the saved loader position is the trained step's --------------------------------------------------------------


def test_trainer_json_loader_state_is_the_trained_step_under_prefetch(features, tiny_t5_encoder):
    cfg = config(features, "tiny-stage2", "prefetch-state", "data.prefetch=3", "schedule.max_steps=6",
                 "schedule.checkpoint_every=1", "schedule.keep_checkpoints=10", t5=tiny_t5_encoder)
    prepare_run(cfg)
    trainer = Trainer(cfg)
    list(trainer.fit())
    starts = [0]  # each epoch's first step: its steps are the batches the one rank's loader yields in it
    while starts[-1] <= 6:
        starts.append(starts[-1] + batches_per_rank(trainer.loader.shards, cfg.data.batch_size, 1,
                                                    epoch=len(starts) - 1)[0])
    for step, url in checkpoint.list_checkpoints(features, "prefetch-state"):
        state = json.loads((Path(url) / "trainer.json").read_text())
        epoch = max(e for e, s in enumerate(starts) if s <= step)
        assert state["loader"] == {"epoch": epoch, "seed": 0, "consumed": {"0": step - starts[epoch]}}
        assert checkpoint.trainer_state(url)["loader"] == state["loader"]


# -- 13: one error line, naming the file ------------------------------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_save_is_one_line(features, cli_run, monkeypatch):
    def full(state, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_optimizer", full)
    line = assert_one_error_line(train_cli(*cli_run("full-disk")), "step-000000002", "No space left on device")
    assert "runs/full-disk/checkpoints" in line
    assert sorted(p.name for p in (Path(run_dir(features, "full-disk")) / "checkpoints").iterdir()) == []


def test_a_nan_loss_names_the_step_the_progress_shows_and_the_batch(features, cli_run, monkeypatch):
    from pixart.data.index import feature_shards, shard_entries
    from pixart.train.diffusion import IDDPM

    real, calls = IDDPM.training_losses, []

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    seen: list[list[str]] = []
    real_step = Trainer.train_step

    def step(self, batch):
        seen.append(list(batch["keys"]))
        return real_step(self, batch)

    monkeypatch.setattr(IDDPM, "training_losses", poisoned)
    monkeypatch.setattr(Trainer, "train_step", step)
    result = train_cli(*cli_run("nan-cli"))
    assert re.findall(r"step (\d+): loss [0-9]", result.output) == ["1", "2"], result.output  # the progress
    shards = feature_shards(features, "sam", 256, caption_set="tiny")
    names = [s.name for i, s in enumerate(shards) if {e.key for e in shard_entries(i, s)} & set(seen[2])]
    line = assert_one_error_line(result, "step 3: loss is nan", *seen[2], *names)
    assert names and "from shards" in line
    assert "optim.lr" in line and "step-000000002" in line  # what to lower, and where the run resumes from


# -- kill -9 at the checkpoint's edges, then an immediate re-run: complete and bit-identical --------------------------

_KILLER = '''
import os, signal, sys
from pixart.train import checkpoint

point, at = sys.argv[1], int(sys.argv[2])
real_done, real_optimizer = checkpoint.write_done, checkpoint.save_optimizer

def write_done(url, state):
    if point == "before-commit" and state["step"] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    real_done(url, state)
    if point == "after-commit" and state["step"] == at:
        os.kill(os.getpid(), signal.SIGKILL)

def save_optimizer(state, path):  # half-way through a save: the models are written, the optimizer is not
    if point == "mid-save" and int(path.name[len("step-"):].split(".")[0]) == at:
        os.kill(os.getpid(), signal.SIGKILL)
    real_optimizer(state, path)

checkpoint.write_done, checkpoint.save_optimizer = write_done, save_optimizer
from flows.cli import main
sys.argv = ["pixart", "train", *sys.argv[3:]]
main()
'''


@pytest.mark.slow
def test_kill_9_around_checkpoints_then_a_rerun_is_complete_and_identical(features, cli_run, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    args = cli_run("kill9", "data.prefetch=2")
    ckpts = Path(run_dir(features, "kill9")) / "checkpoints"
    for point, at in (("after-commit", 2), ("mid-save", 4), ("before-commit", 4)):
        done = subprocess.run([sys.executable, str(script), point, str(at), *args], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == -9, (point, done.stdout, done.stderr)
        assert checkpoint.latest(features, "kill9").endswith("step-000000002"), point
        assert metric_steps(features, "kill9")[:2] == [1, 2], point  # the committed steps are always logged
    assert any(".tmp-" not in p.name and p.name == "step-000000004" for p in ckpts.iterdir())  # published, unmarked
    result = train_cli(*args)  # at once: the dead run's lease does not block it
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000000002", "step-000000002.done", "step-000000004",
                                                       "step-000000004.done"]  # the torn save was swept

    assert train_cli(*cli_run("kill9-clean", "data.prefetch=2")).exit_code == 0
    assert metric_steps(features, "kill9") == [1, 2, 3, 4]
    assert metric_losses(features, "kill9") == metric_losses(features, "kill9-clean")
    got, want = (Path(checkpoint.latest(features, run)) for run in ("kill9", "kill9-clean"))
    for part in ("transformer", "ema"):
        a, b = load_file(got / part / WEIGHTS), load_file(want / part / WEIGHTS)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    a, b = (torch.load(d / "optimizer.pt", weights_only=True)["state"] for d in (got, want))
    assert all(torch.equal(a[i][k], b[i][k]) for i in b for k in b[i])

"""Hostile or broken files that training and sampling read back: a pickled optimizer state, torn or forged
safetensors, torn stored conditions. Each is refused or redone, with one `error:` line naming the file; nothing is
ever unpickled."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from flows.train_stage import run_training
from pixart.train import checkpoint
from pixart.train.prepare import prepare_run
from pixart.train.trainer import Trainer
from tests.test_train import config
from tests.train_cli import WEIGHTS, assert_one_error_line, train_cli


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PIXART_TEST_PWNED']}",))


def test_a_pickled_optimizer_state_is_refused_in_one_line(features, cli_run, tmp_path, monkeypatch):
    assert train_cli(*cli_run("evil-opt", "schedule.max_steps=2")).exit_code == 0
    ckpt = Path(checkpoint.latest(features, "evil-opt"))
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("PIXART_TEST_PWNED", str(pwned))
    torch.save({"state": {}, "param_groups": [_Evil()]}, ckpt / "optimizer.pt")  # runs a command if unpickled
    assert_one_error_line(train_cli(*cli_run("evil-opt")), str(ckpt / "optimizer.pt"))
    assert not pwned.exists()


@pytest.mark.parametrize("damage", ["header-too-large", "invalid-offset"])
def test_a_corrupt_checkpoint_safetensors_is_named_in_one_line(features, cli_run, damage):
    run = f"torn-{damage}"
    assert train_cli(*cli_run(run, "schedule.max_steps=2")).exit_code == 0
    weights = Path(checkpoint.latest(features, run)) / "transformer" / WEIGHTS
    data = weights.read_bytes()
    if damage == "header-too-large":
        data = struct.pack("<Q", 1 << 40) + data[8:]
    else:
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = [0, 1 << 30]  # past the end of the file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        data = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    weights.write_bytes(data)
    assert_one_error_line(train_cli(*cli_run(run)), str(weights))


def test_corrupt_stored_conditions_are_named_or_encoded_again(features, tiny_t5_encoder, tiny_vae):
    from pixart.train.conditions import Conditions, ConditionsError, conditions_url

    cfg = config(features, "tiny-stage2", "torn-conditions", "schedule.max_steps=1", t5=tiny_t5_encoder,
                 vae=tiny_vae)
    prepare_run(cfg)
    url = conditions_url(cfg)
    before = Conditions.load(cfg)
    Path(url).write_bytes(Path(url).read_bytes()[:100])
    with pytest.raises(ConditionsError, match=f"{url}: not readable conditions"):
        Trainer(cfg)  # a worker reading them names the file
    run_training(cfg, log=lambda m: None)  # a run starting encodes them again
    again = Conditions.load(cfg)
    assert all(torch.equal(a, b) for a, b in zip(vars(again).values(), vars(before).values(), strict=True))


# -- pixart sample on a corrupt checkpoint: one line naming the file --------------------------------------------------


@pytest.mark.parametrize("damage", ["torn", "git-lfs-pointer", "wrong-shape", "missing-tensor"])
def test_sample_on_a_corrupt_safetensors_is_one_line_naming_the_file(features, cli_run, damage):
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from flows.cli import app

    run = f"sample-bad-{damage}"
    assert train_cli(*cli_run(run, "schedule.max_steps=2")).exit_code == 0
    weights = Path(checkpoint.latest(features, run)) / "ema" / WEIGHTS  # what `pixart sample` loads
    state = load_file(str(weights))
    first = sorted(state)[0]
    if damage == "torn":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "git-lfs-pointer":  # a clone without git-lfs
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4096\n")
    elif damage == "wrong-shape":  # readable safetensors, not this model's (was a RuntimeError traceback)
        save_file({**state, first: torch.zeros(3, 3)}, str(weights))
    else:  # a tensor missing: diffusers would sample with it at its random init, warning only
        save_file({k: v for k, v in state.items() if k != first}, str(weights))
    result = CliRunner().invoke(app, ["sample", "grid", f"checkpoint={Path(features) / 'runs' / run}",
                                      "sample_prompts=[a red fox]", "sample_steps=1",
                                      f"out={Path(features) / f'{run}.png'}"])
    assert_one_error_line(result, str(weights), *([first] if damage == "missing-tensor" else []))
    assert not (Path(features) / f"{run}.png").exists()


def test_sample_with_a_vae_that_is_gone_is_one_line_naming_it(features, cli_run, tmp_path):
    """The checkpoint's recorded VAE was moved away: `pixart sample` says which model and where, through the same
    loader as extraction (storage.hub), not a hub-client traceback."""
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app

    run = "sample-vae-gone"
    assert train_cli(*cli_run(run, "schedule.max_steps=2")).exit_code == 0
    saved = Path(checkpoint.latest(features, run)) / "config.yaml"
    cfg = yaml.safe_load(saved.read_text())
    gone = str(tmp_path / "moved-away" / "vae")
    saved.write_text(yaml.safe_dump({**cfg, "vae_model": gone}))
    result = CliRunner().invoke(app, ["sample", "grid", f"checkpoint={Path(features) / 'runs' / run}",
                                      "sample_prompts=[a red fox]", "sample_steps=1",
                                      f"out={Path(features) / f'{run}.png'}"])
    assert_one_error_line(result, gone, "VAE", "no such directory")
    assert not (Path(features) / f"{run}.png").exists()

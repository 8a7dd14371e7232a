"""The `pixart` command: one shape for every command (PRESET key=value ... [--force]), help generated from each
command's config model, errors as one `error:` line, and a start that imports no torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import typer.main
from typer.testing import CliRunner

from flows.cli import app
from tests.test_configio import CONFIGS
from tests.test_configio import config_class as _config_class

COMMANDS = [*CONFIGS, "status"]  # status reads the pipeline's config


def config_class(command: str) -> type:
    return _config_class("pipeline" if command == "status" else command)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def leaf_keys(model, prefix: str = "") -> dict[str, str]:
    """Every dotted key of a config model with its description."""
    out = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
            out.update(leaf_keys(field.annotation, f"{prefix}{name}."))
        else:
            out[prefix + name] = field.description or ""
    return out


def test_every_command_takes_a_preset_then_overrides_and_no_other_flags():
    group = typer.main.get_command(app)
    assert sorted(group.commands) == sorted([*COMMANDS, "demo"])
    for name in COMMANDS:
        params = group.commands[name].params
        arguments = [p for p in params if p.param_type_name == "argument"]
        assert [a.name for a in arguments] == ["preset", "overrides"] and arguments[1].nargs == -1, name
        flags = {o for p in params if p.param_type_name == "option" for o in p.opts} - {"--help"}
        force = {"--force"} if "force" in config_class(name).model_fields else set()
        assert flags == force | ({"--estimate"} if name in ("extract", "status") else set()), name


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_the_presets_and_every_key_with_its_description(command):
    from storage.configio import preset_names

    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps the lines
    kind = "pipeline" if command == "status" else command  # status reads the pipeline's presets
    assert preset_names(kind), kind
    assert f"Presets (configs/{kind}/): {', '.join(preset_names(kind))}" in text
    keys = leaf_keys(config_class(command))
    for key, description in keys.items():
        assert description, f"{command}: {key} has no description"
        assert f"{key}: {' '.join(description.split())}" in text, key
    if command in ("train", "sample", "audit"):
        assert not {"force", "max_shards", "create_bucket"} & set(keys)
        assert "force:" not in text and "max_shards:" not in text and "create_bucket:" not in text


@pytest.mark.parametrize("args, fragment", [
    (["train", "tiny-stage1", "force=true"], "force: unknown key"),
    (["train", "tiny-stage1", "precision=float32"], "precision: unknown key; renamed to 'dtype'"),
    (["train", "stage3"], "presets: stage1, stage2, stage3-256, stage3-512, stage3-1024, tiny-stage1"),
    (["train", "output_root=/x"], "a preset comes first"),
    (["caption", "sam", "max_t5_tokens=100"], "renamed to 'max_tokens'"),
    (["extract", "sam-256", "dataset=laion"], "unknown dataset 'laion'; known: imagenet, journeydb, sam"),
    (["sample", "grid"], "checkpoint: Field required"),
    (["sample", "grid", "checkpoint=/nowhere", "sample_prompts=[]"], "sample_prompts: List should have at least"),
    (["export", "pipeline", "checkpoint=/nowhere/step-1"], "out: Field required"),
    (["audit", "sam", "dataset=laion"], "unknown dataset 'laion'"),
    (["audit", "sam", "bogus=1"], "bogus: unknown key"),
])
def test_a_bad_preset_or_key_is_one_error_line_and_exit_2(args, fragment):
    result = invoke(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output


def test_export_and_sample_map_their_errors_to_one_line(tmp_path):
    missing = tmp_path / "runs" / "nope" / "checkpoints" / "step-000000001"
    for args in (["export", "pipeline", f"checkpoint={missing}", f"out={tmp_path / 'e'}"],
                 ["sample", "grid", f"checkpoint={missing}", f"out={tmp_path / 's.png'}"]):
        result = invoke(*args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], result.output
    assert not (tmp_path / "e").exists() and not (tmp_path / "s.png").exists()


# -- starting without torch -------------------------------------------------------------------------------------------

def test_pixart_help_imports_no_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "ingest" in proc.stdout, proc.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert "typer" in imported and "torch" not in imported


def test_pixart_ingest_runs_without_importing_torch(samples, tmp_path):
    script = textwrap.dedent("""
        import sys
        from typer.testing import CliRunner
        from flows.cli import app

        runner = CliRunner()
        for args in (["--help"], ["ingest", "--help"], ["ingest", "sam", "bogus=1"],
                     ["ingest", "sam", "source=" + sys.argv[1], "output_root=" + sys.argv[2], "worker_type=thread"]):
            result = runner.invoke(app, args)
            print(args[:2], result.exit_code, "samples ok" in result.output)
        print("torch modules:", sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    """)
    proc = subprocess.run([sys.executable, "-c", script, samples["sam"], str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split("]", 1)[1].split() for line in lines[:4]] == [
        ["0", "False"], ["0", "False"], ["2", "False"], ["0", "True"]], proc.stdout
    assert lines[-1] == "torch modules: []", proc.stdout

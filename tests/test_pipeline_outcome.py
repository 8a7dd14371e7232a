"""What a pipeline run reports without running the demo: green only when every selected step is done (a selected
step left waiting is not a success), exit 3 for busy shards and 1 for failures, failures that `pixart status`
shows until the step is done, an external init counted by content, and dataset names checked when the config loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import failure_url, init_identity, run_pipeline, train_args
from flows.pipeline_config import PipelineConfig
from storage.configio import load_config
from storage.errors import ConfigError
from storage.lease import Lease


def config_yaml(tmp_path: Path, samples: dict, *, imagenet: str | None = None, init: str | None = None) -> str:
    """SA-1B and ImageNet sample shards and ImageNet's features; with `init`, a stage-1 run on them from it."""
    stage1 = {"preset": "tiny-stage1", "features": "imagenet-256", "overrides": [f"init={init}"]}
    spec = {"output_root": str(tmp_path / "pixart"),
            "datasets": {"sam": {"source": samples["sam"], "overrides": ["worker_type=thread"]},
                         "imagenet": {"source": imagenet or samples["imagenet"],
                                      "synset_mapping": samples["synset_mapping"],
                                      "overrides": ["worker_type=thread"]}},
            "features": {"imagenet-256": {"dataset": "imagenet", "preset": "imagenet-256"}},
            "train": {"stage1": stage1} if init else {}}  # no train step: the estimate then imports no torch
    path = tmp_path / f"pipeline-{len(list(tmp_path.glob('pipeline-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def pixart(*args: str):
    return CliRunner().invoke(app, list(args))


def status_lines(config: str) -> dict[str, str]:
    result = pixart("status", config)
    assert result.exit_code == 0, result.output
    return {line.split()[0]: line for line in result.output.splitlines() if line.strip()}


def test_a_selected_step_waiting_for_a_step_only_leaves_out_is_not_green(samples, tmp_path):
    config = config_yaml(tmp_path, samples)
    cfg = load_config(PipelineConfig, config, ["only=[extract-imagenet-256]"], kind="pipeline")
    ran = []
    outcome = run_pipeline(cfg, lambda step, preset, args: ran.append(step.name) or {}, log=lambda message: None)
    assert ran == [] and not outcome.ok and outcome.exit_code == 1
    rows = {r["step"]: r["state"] for r in outcome.rows}
    assert rows["extract-imagenet-256"] == "waiting" and rows["ingest-imagenet"] == "not run", rows
    assert list(outcome.failed) == ["extract-imagenet-256"]
    why = outcome.failed["extract-imagenet-256"]
    assert "ingest-imagenet" in why and "not selected (only= leaves it out)" in why, why

    result = pixart("pipeline", config, "only=[extract-imagenet-256]")
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: failed: extract-imagenet-256: ") and "ingest-imagenet" in last, last
    assert "only= leaves it out" in last, last

    # What it was asked to do is done: green, though the unselected steps after it wait.
    assert pixart("pipeline", config, "only=[ingest-imagenet]").exit_code == 0


def test_a_step_left_with_busy_shards_exits_3_naming_the_step_and_shard(samples, tmp_path, monkeypatch):
    import flows._stage
    from storage.layout import manifest_url

    monkeypatch.setattr(flows._stage, "RETRY_DELAYS", ())
    config = config_yaml(tmp_path, samples)
    holder = Lease(manifest_url(str(tmp_path / "pixart"), "sam", "sa_000000"))

    def ingest_while_held(config):  # another run holds sa_000000 for the whole pipeline run
        holder.acquire()
        try:
            result = pixart("pipeline", config, "only=[ingest-sam,ingest-imagenet]")
        finally:
            holder.release()
        return result, result.output.strip().splitlines()[-1]

    busy, last = ingest_while_held(config)
    assert busy.exit_code == 3, busy.output
    assert last.startswith("error: incomplete: ingest-sam: ") and "sa_000000" in last, last
    assert "ingest-imagenet" not in last, last  # it is done
    assert "| ingest-sam | incomplete |" in busy.output and "INCOMPLETE ingest-sam:" in busy.output
    assert pixart("status", config).exit_code == 0
    assert "failed" not in status_lines(config)["ingest-sam"]  # busy is not a failure

    # A failure beside busy shards is a failure: exit 1.
    mixed, last = ingest_while_held(config_yaml(tmp_path, samples, imagenet=str(tmp_path / "no-such-imagenet")))
    assert mixed.exit_code == 1, mixed.output
    assert "ingest-sam: " in last and "sa_000000" in last and "ingest-imagenet: " in last, last
    assert pixart("pipeline", config, "only=[ingest-sam,ingest-imagenet]").exit_code == 0  # once the lease is gone


def test_status_says_failed_with_the_message_until_the_step_is_done(samples, tmp_path):
    missing = tmp_path / "no-such-imagenet"
    bad = config_yaml(tmp_path, samples, imagenet=str(missing))
    result = pixart("pipeline", bad, "only=[ingest-imagenet]")
    assert result.exit_code == 1, result.output
    cfg = load_config(PipelineConfig, bad, [], kind="pipeline")
    record = Path(failure_url(cfg, "ingest-imagenet"))
    assert record.is_file() and str(missing) in record.read_text()
    line = status_lines(bad)["ingest-imagenet"]
    assert line.split()[1] == "failed:" and str(missing) in line, line
    assert status_lines(bad)["ingest-sam"].split()[1] == "pending"  # never run: not failed

    good = config_yaml(tmp_path, samples)  # the source fixed, the same output root
    assert pixart("pipeline", good, "only=[ingest-imagenet]").exit_code == 0
    assert not record.exists()
    assert status_lines(good)["ingest-imagenet"].split()[1] == "done"


def test_an_external_init_counts_by_content_not_by_path_or_mtime(samples, tmp_path):
    a, b = tmp_path / "DiT-A.pt", tmp_path / "DiT-B.pt"
    a.write_bytes(b"A" * 3_000_000)  # over 2 MiB: its first and last MiB are read
    b.write_bytes(b"A" * 2_999_999 + b"B")  # the same size, another last byte
    init = tmp_path / "init.pt"

    def run_name(source: Path) -> str:
        shutil.copyfile(source, init)  # a new mtime every time
        cfg = load_config(PipelineConfig, config_yaml(tmp_path, samples, init=str(init)), [], kind="pipeline")
        preset, args = train_args(cfg, "stage1")
        assert f"init={init}" in args
        return args[-1].removeprefix("run=")

    first = run_name(a)
    assert run_name(b) != first  # other weights under the same path: a new run
    assert run_name(a) == first  # the same weights copied again: the same run
    assert init_identity(str(a)) == init_identity(str(init)) != init_identity(str(b))

    model = tmp_path / "dit-dir"  # a directory: its config.json and weight files
    model.mkdir()
    (model / "config.json").write_text('{"depth": 28}')
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "README.md").write_text("notes")
    before = init_identity(str(model))
    (model / "README.md").write_text("other notes")
    assert init_identity(str(model)) == before
    (model / "config.json").write_text('{"depth": 12}')
    assert init_identity(str(model)) != before
    assert init_identity("PixArt-alpha/PixArt-XL-2-256x256") == "id:PixArt-alpha/PixArt-XL-2-256x256"


def test_an_unknown_dataset_is_refused_when_the_config_loads_listing_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown dataset 'laion'; known: imagenet, journeydb, sam"):
        load_config(PipelineConfig, "demo", [f"output_root={tmp_path}", "datasets.laion.source=/tmp/a"],
                    kind="pipeline")
    result = pixart("status", "demo", f"output_root={tmp_path}", "datasets.laion.source=/tmp/a")
    assert result.exit_code == 2 and "unknown dataset 'laion'" in result.output, result.output
    assert "ingest-laion" not in result.output


def test_both_runners_count_an_extract_steps_images_once():
    """The local runner's row (summary_row) and the Prefect flow's (_subflow, from the stage flow's returned counts)
    read the same counts the same way: an extract step's text and latent rows of 8 images are 8 samples."""
    from flows.pipeline import counted

    row = counted({"ok_by_kind": {"text": 8, "latents": 8}, "num_ok": 16, "num_error": 1})
    assert row["samples"] == 8 and row["errors"] == 1 and row["features"].startswith("8 text, 8 latents")
    assert counted({"ok_by_kind": {"text": 5}, "num_ok": 5, "num_error": 0})["samples"] == 5  # text only
    assert counted({"num_ok": 7, "num_error": 0}) == {"samples": 7, "errors": 0}  # any other stage

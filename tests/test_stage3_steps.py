"""Stage 3 is three steps (paper Table 4): hq256 -> hq512 -> ms1024. Each has a preset that names it, the CLI refuses
a stage 3 without its step, the README's cost table counts what the presets run, and the demo runs the same chain."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pixart.train.config import STAGE_PRESETS, TrainConfig
from storage.configio import load_config
from storage.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# paper Table 4 (steps, per-GPU batch, GPUs, V100-days) and the official config's per-GPU batch where it differs
PAPER = {"hq256": (90_000, 178, 64, 416), "hq512": (100_000, 40, 64, 320), "ms1024": (16_000, 12, 32, 160)}
OFFICIAL_BATCH = {"hq256": 176, "hq512": 38, "ms1024": 12}  # PixArt_xl2_img256/512_internal, img1024_internalms
SIZES = {"hq256": (256, False), "hq512": (512, False), "ms1024": (1024, True)}


def preset(name: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, name, ["data.caption_set=x", *overrides], kind="train")


@pytest.mark.parametrize("step", ["hq256", "hq512", "ms1024"])
def test_each_stage3_step_has_a_preset_that_names_it(step):
    name = STAGE_PRESETS[(3, step)]
    assert name == f"stage3-{SIZES[step][0]}"
    cfg = preset(name)
    steps, _, gpus, _ = PAPER[step]
    assert cfg.stage == 3 and cfg.stage_step == step
    assert (cfg.data.dataset, cfg.data.base_size, cfg.data.multi_scale) == ("journeydb", *SIZES[step])
    assert cfg.model.multi_scale == SIZES[step][1] and cfg.model.preset == "pixart-xl-2"
    assert (cfg.schedule.max_steps, cfg.data.batch_size, cfg.ray.num_workers) == (steps, OFFICIAL_BATCH[step], gpus)


def test_a_stage3_config_must_name_a_step_that_fits_it():
    with pytest.raises(ConfigError, match="stage 3 is three steps"):
        preset("stage3-512", "stage_step=null")
    with pytest.raises(ConfigError, match="stage_step=hq256 trains at 256"):
        preset("stage3-512", "stage_step=hq256")
    with pytest.raises(ConfigError, match="stage_step=ms1024 trains at 1024 multi-scale"):
        preset("stage3-512", "stage_step=ms1024", "data.base_size=1024")
    with pytest.raises(ConfigError, match="is a step of stage 3"):
        preset("stage2", "stage_step=hq256")


def cli(*args: str):
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, ["train", *args])


def one_error(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_train_stage3_without_a_step_is_refused_listing_the_steps(tmp_path):
    error = one_error(cli("stage3", f"output_root={tmp_path}", "data.caption_set=x"))
    positions = [error.index(f"stage3-{SIZES[s][0]}") for s in ("hq256", "hq512", "ms1024")]
    assert positions == sorted(positions)  # in the order they run
    text = [f"output_root={tmp_path}", "data.caption_set=x"]
    assert "stage 3 is three steps" in one_error(cli("stage3-256", "stage_step=null", *text))
    assert "is a step of stage 3" in one_error(cli("stage2", "stage_step=hq256", *text))
    assert "hq256" in one_error(cli("stage3-256", "stage_step=hq1024", f"output_root={tmp_path}"))
    assert not list(tmp_path.iterdir())  # nothing of a run written


@pytest.mark.parametrize("step", ["hq256", "hq512", "ms1024"])
def test_train_stage3_step_runs_that_steps_preset(step, tmp_path, monkeypatch):
    import flows.train_stage

    seen = []

    def run_training(cfg, log=print, progress=None):
        seen.append(cfg)
        return {"run": cfg.run, "steps": 0, "final_loss": None, "gpu_hours": 0.0, "stage": 3, "stage_step": step,
                "paper_v100_days": PAPER[step][3]}

    monkeypatch.setattr(flows.train_stage, "run_training", run_training)
    result = cli(STAGE_PRESETS[(3, step)], f"output_root={tmp_path}", "data.caption_set=x")
    assert result.exit_code == 0, result.output
    assert seen[0].stage_step == step and seen[0].data.base_size == SIZES[step][0]
    assert f"paper stage 3 {step}: {PAPER[step][3]} V100-days" in result.output


def test_the_cost_summary_is_the_papers_for_the_step():
    from pixart.train.monitor import cost_summary

    rows = [{"step": 1, "loss": 0.1, "gpu_hours": 0.5, "samples_per_s": 1.0}]
    for step, (_, _, _, days) in PAPER.items():
        assert cost_summary(rows, 3, step)["paper_v100_days"] == days
    assert cost_summary(rows, 2)["paper_v100_days"] == 672


def _readme_cost_rows() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| stage | preset |"):]
    table = table[:table.index("\n\n")]
    rows = {}
    for line in table.splitlines()[2:]:
        found = re.search(r"`(stage[\w-]+)`", line)
        assert found, line
        rows[found.group(1)] = line
    return rows


def test_the_readme_cost_table_counts_what_the_presets_run():
    """Each row: the preset, its steps x global batch, the samples, H100-hours at the bare rate, the paper's
    V100-days (for stage 3, its step's)."""
    rows = _readme_cost_rows()
    assert list(rows) == ["stage1", "stage2", "stage3-256", "stage3-512", "stage3-1024"]  # the chain, in order
    rate = {256: 309, 512: 74, 1024: 14}  # the bare-loop H100 samples/s the table is priced at
    days = {"stage1": 88, "stage2": 672, **{STAGE_PRESETS[(3, s)]: d for s, (*_, d) in PAPER.items()}}
    for name, line in rows.items():
        cfg = load_config(TrainConfig, name, [] if name == "stage1" else ["data.caption_set=x"], kind="train")
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert cells[1] == f"`{name}`", line
        steps, batch = re.match(r"([\d.]+)K x (\d+) ", cells[2]).groups()
        global_batch = cfg.data.batch_size * cfg.ray.num_workers
        assert (float(steps) * 1000, int(batch)) == (cfg.schedule.max_steps, global_batch), line
        assert f"({cfg.data.batch_size} x {cfg.ray.num_workers}" in cells[2], line
        samples = cfg.schedule.max_steps * global_batch
        scale, unit = {"B": 1e9, "M": 1e6}[cells[3][-1]], cells[3][:-1]
        assert abs(float(unit) * scale - samples) / samples < 0.01, line
        assert int(cells[4]) == round(samples / rate[cfg.resolution] / 3600), line
        assert cells[5] == f"{days[name]} ({days[name] * 24})", line


def test_the_demo_pipeline_runs_stage3_as_its_three_steps_each_from_the_previous_run(tmp_path):
    from flows.pipeline import plan
    from flows.pipeline_config import PipelineConfig
    from flows.train_stage import load_train_config
    from storage.configio import load_config

    out = str(tmp_path / "pixart")
    cfg = load_config(PipelineConfig, "demo", [f"output_root={out}", f"demo_inputs={tmp_path}",
                                               "models={llava: l, t5_tokenizer: t, t5: t5, vae: vae}"],
                      kind="pipeline")
    steps = [s for s in plan(cfg) if s.kind in ("train", "export")]
    assert [s.name for s in steps] == ["train-stage1", "train-stage2", "train-stage3-hq256", "train-stage3-hq512",
                                       "train-stage3-ms1024", "export"]
    seen = [load_train_config(*s.resolve()) for s in steps[:-1]]
    assert [(c.stage, c.stage_step, c.resolution, c.data.multi_scale) for c in seen] == [
        (1, None, 256, False), (2, None, 256, False), (3, "hq256", 256, False), (3, "hq512", 512, False),
        (3, "ms1024", 1024, True)]
    assert [c.init for c in seen] == [None, *(f"{out}/runs/{c.run}" for c in seen[:-1])]  # each from the one before
    assert steps[-1].after == ["train-stage3-ms1024"] and steps[-1].resolve()[1] == ["stage3-ms1024"]


def fake_run(root: Path, run: str, stage: int, step: str | None) -> Path:
    """A run directory with one committed checkpoint of a tiny PixArt whose trainer.json records (stage, step)."""
    from pixart.models import ModelConfig, build_pixart
    from storage.commit import write_done

    ckpt = root / "runs" / run / "checkpoints" / "step-000000002"
    build_pixart(ModelConfig(preset="pixart-tiny"), 256, caption_channels=32).save_pretrained(ckpt / "transformer")
    state = {"step": 2, "stage": stage, **({"stage_step": step} if step else {})}
    (ckpt / "trainer.json").write_text(json.dumps(state))
    (ckpt / "config.yaml").write_text(f"stage: {stage}\nstage_step: {step or 'null'}\n")
    write_done(str(ckpt), state)
    return ckpt.parent.parent


def test_a_stage3_step_must_start_from_the_previous_step_unless_told(tmp_path):
    text = [f"output_root={tmp_path / 'out'}", "data.caption_set=x"]
    stage2 = fake_run(tmp_path, "s2", 2, None)
    line = one_error(cli("stage3-1024", *text, f"init={stage2}"))  # hq256 and hq512 skipped
    assert "is stage 2" in line and "stage_step=ms1024 starts from stage 3 hq512" in line and "init_any_step" in line
    line = one_error(cli("stage3-512", *text))  # random weights
    assert "stage_step=hq512 has no init" in line and "stage 3 hq256" in line
    assert not [f for f in (tmp_path / "out").rglob("*") if f.is_file()]  # refused before a run writes anything
    # told: the init check passes, and the run stops at the next check (there are no features here)
    assert "run pixart extract first" in one_error(cli("stage3-1024", *text, f"init={stage2}", "init_any_step=true"))
    assert "run pixart extract first" in one_error(cli("stage3-512", *text, "init_any_step=true"))


def test_the_stage3_chain_is_read_from_the_init_runs_record(tmp_path):
    from pixart.train.weights import check_init, init_source

    runs = {"s2": fake_run(tmp_path, "s2", 2, None), "hq256": fake_run(tmp_path, "hq256", 3, "hq256"),
            "hq512": fake_run(tmp_path, "hq512", 3, "hq512")}
    for step, init in (("hq256", "s2"), ("hq512", "hq256"), ("ms1024", "hq512")):
        cfg = preset(STAGE_PRESETS[(3, step)], f"init={runs[init]}")
        check_init(cfg)  # the previous step: accepted
        assert "records no stage" not in init_source(cfg).note
    with pytest.raises(ConfigError, match=r"is stage 3 hq256, but stage_step=ms1024 starts from stage 3 hq512"):
        check_init(preset("stage3-1024", f"init={runs['hq256']}/checkpoints/step-000000002"))
    bare = runs["s2"] / "checkpoints" / "step-000000002" / "transformer"  # a transformer that records no stage
    note = init_source(preset("stage3-512", f"init={bare}")).note
    assert "records no stage" in note and "stage 3 hq256" in note


def test_an_export_records_its_stage3_step_so_an_init_from_it_is_checked():
    from pixart.export import _info
    from pixart.train.weights import _recorded_stage

    arch = {"sample_size": 64, "interpolation_scale": 1.0, "use_additional_conditions": False,
            "_class_name": "PixArtTransformer2DModel"}
    info = _info("/runs/hq256/checkpoints/step-000000002", {"step": 2}, {"stage": 3, "stage_step": "hq256",
                                                                          "run": "hq256"}, "ema", arch, False)
    assert _recorded_stage(info) == (3, "hq256")  # hq512 from this export passes, ms1024 from it is refused
    stage2 = _info("/runs/s2/checkpoints/step-000000002", {"step": 2}, {"stage": 2, "run": "s2"}, "ema", arch, False)
    assert _recorded_stage(stage2) == (2, None)

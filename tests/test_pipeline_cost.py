"""Cost and storage accounting of the pipeline (`flows/pipeline_cost.py`, `pixart/cost.py`): the estimate made
before a run against what the run then writes, sample counts against the manifests, GPU-hours against the rate,
and `pixart status --estimate`.

Tolerances, and why: a source read whole gives its exact count and the exact manifests (the same rows, written the
same way), so ingest must agree within 5 %; latents are fp16 arrays of the bucket's shape plus a tar header and a
small json per sample, whose few hundred bytes `pixart.features.estimate` rounds up (about 2 % of a 256 px
sample), so 10 %; text before any caption exists assumes max_new_tokens + EOS tokens per caption, an upper bound on
the real lengths, so it may only be above, by less than 2x at these lengths; a sample cut short of the shard's end
extrapolates by bytes, 30 % on these 4-image shards of photos of different sizes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.pipeline_config import PipelineConfig
from flows.pipeline_cost import comparison_markdown, estimate_plan, measure_plan
from pixart.cost import checkpoints_kept, gpu_hours, grid_bytes, human_bytes, human_hours, load_rates
from storage.configio import load_config
from storage.errors import ConfigError
from storage.manifest import read_dataset

CAPTION = ["generation.max_new_tokens=12", "batch_size=4", "caption_set=tiny"]  # the `captioned` fixture's set


def within(estimated: float, measured: float, tolerance: float) -> bool:
    return abs(estimated - measured) <= tolerance * measured


def pipeline_yaml(tmp_path: Path, root: str, samples: dict, models: dict) -> Path:
    """A pipeline over the session's sample shards, laid out as the `features` fixture made them."""
    spec = {"output_root": root, "models": models, "caption": CAPTION,
            "datasets": {"sam": {"source": samples["sam"], "caption": True, "overrides": ["worker_type=thread"]},
                         "imagenet": {"source": samples["imagenet_wds"], "synset_mapping": samples["synset_mapping"],
                                      "overrides": ["worker_type=thread"]}},
            "features": {"sam-256": {"dataset": "sam", "preset": "sam-256"},
                         "sam-512": {"dataset": "sam", "preset": "sam-256",
                                     "overrides": ["what=latents", "base_size=512", "multi_scale=true"]},
                         "imagenet-256": {"dataset": "imagenet", "preset": "imagenet-256"}},
            "train": {"stage1": {"preset": "tiny-stage1", "features": "imagenet-256"}}}
    path = tmp_path / f"pipeline-{Path(root).name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def made(features, samples, tiny_llava, tiny_t5, tiny_t5_encoder, tiny_vae, tmp_path):
    """(the config of the root the `features` fixture made, the same pipeline on a fresh root)."""
    models = {"llava": tiny_llava, "t5_tokenizer": tiny_t5, "t5": tiny_t5_encoder, "vae": tiny_vae}
    done = load_config(PipelineConfig, str(pipeline_yaml(tmp_path, features, samples, models)), kind="pipeline")
    fresh = load_config(PipelineConfig, str(pipeline_yaml(tmp_path, str(tmp_path / "fresh"), samples, models)),
                        kind="pipeline")
    return done, fresh


# ---------------------------------------------------------------------------------------------------------------------
# The arithmetic
# ---------------------------------------------------------------------------------------------------------------------


def test_rates_come_from_the_table_and_key_value_overrides():
    rates = load_rates("h100")
    assert "H100" in rates.card and rates.train(256) == 309 and rates.vae(1024, fp32=True) == 19
    assert load_rates("h100", ["train_256=100"]).train(256) == 100
    assert rates.caption_at(rates.caption_new_tokens) == rates.caption
    assert rates.caption_at(30) == pytest.approx(10 * rates.caption)  # decode-bound: 10x fewer tokens, 10x faster
    with pytest.raises(ConfigError, match="did you mean 'train_256'"):
        load_rates("h100", ["train_265=100"])
    cfg = load_config(PipelineConfig, "demo", ["rate_table=h100", "rates.t5=1", "output_root=/x"], kind="pipeline")
    assert cfg.rate_card().t5 == 1 and cfg.rate_card().train(256) == 309  # the pipeline's own keys
    with pytest.raises(ConfigError, match=r"rates.train_265 is not a rate; did you mean 'rates.train_256'"):
        load_config(PipelineConfig, "demo", ["rates.train_265=1"], kind="pipeline")  # refused at load, as typed


def test_gpu_hours_checkpoints_and_units():
    assert gpu_hours(3600 * 309, 309) == 1.0
    assert checkpoints_kept(150_000, 2000, 3) == 3 and checkpoints_kept(4, 2, 5) == 2
    assert checkpoints_kept(5, 2, 9) == 3  # steps 2, 4 and the end (5)
    assert grid_bytes(4, 256, 10, 0) == 4 * 256 * 256 * 3  # only the final grid
    assert grid_bytes(4, 256, 10, 5) == 2 * grid_bytes(4, 256, 10, 0)  # step 5 and the end (10)
    assert human_bytes(29_300_000_000) == "29.3 GB" and human_hours(14_195.3) == "14,195"
    assert human_hours(0.0000847) == "0.000085"  # never in exponent form


# ---------------------------------------------------------------------------------------------------------------------
# Before and after, on the session's sample shards
# ---------------------------------------------------------------------------------------------------------------------


def test_estimate_before_a_run_matches_what_the_run_wrote(made, tmp_path):
    done, fresh = made
    rates = load_rates("h100")
    before = {e.step: e for e in estimate_plan(fresh, rates)}
    assert not (tmp_path / "fresh").exists()  # nothing written under the output root
    measured = measure_plan(done)
    for ds in ("sam", "imagenet"):
        manifests = read_dataset(done.output_root, ds)
        ok = sum(s == "ok" for s in manifests["status"].to_pylist())
        assert before[f"ingest-{ds}"].samples == ok == measured[f"ingest-{ds}"].samples == 8
        assert within(before[f"ingest-{ds}"].bytes, measured[f"ingest-{ds}"].bytes, 0.05), ds
        assert before[f"ingest-{ds}"].gpu_hours == 0
    for step in ("extract-sam-512", "extract-imagenet-256"):  # latents only
        assert before[step].samples == measured[step].samples == 8
        assert within(before[step].bytes, measured[step].bytes, 0.10), (step, before[step], measured[step])
    text = before["extract-sam-256"]  # text at max_new_tokens + EOS: at or above what the captions made
    assert text.samples == measured["extract-sam-256"].samples == 16  # 8 text + 8 latents
    assert measured["extract-sam-256"].bytes <= text.bytes < 2 * measured["extract-sam-256"].bytes
    assert "max_new_tokens=12 + EOS" in text.basis


def test_estimate_after_a_run_is_exact_where_outputs_exist_and_shows_their_rate(made):
    done, _ = made
    rates = load_rates("h100", ["train_256=100", "t5=50", "vae_256=25"])
    after = {e.step: e for e in estimate_plan(done, rates)}
    measured = measure_plan(done)
    assert after["ingest-sam"].bytes == measured["ingest-sam"].bytes  # the committed manifests themselves
    assert "committed manifests: all 2 shards (exact)" in after["ingest-sam"].basis
    assert "measured here:" in after["ingest-sam"].measured
    sam = after["extract-sam-256"]  # tokens now from the caption set
    assert "caption set tiny" in sam.basis and within(sam.bytes, measured["extract-sam-256"].bytes, 0.10)
    assert sam.gpu_hours == pytest.approx(8 / 50 / 3600 + 8 / 25 / 3600)  # 8 captions at T5 50/s, 8 images at 25/s
    train = after["train-stage1"]  # tiny-stage1: 4 steps x batch 2 x 1 worker at the overridden 256 px rate
    assert train.samples == 4 * 2 and train.gpu_hours == pytest.approx(8 / 100 / 3600)
    table = comparison_markdown(list(after.values()), measured)
    assert "| ingest-sam | 8 | 8 |" in table and "| extract-sam-256 | 16 | 16 |" in table


def test_a_sample_cut_short_extrapolates_by_bytes_and_shards(made):
    _, fresh = made
    est = {e.step: e for e in estimate_plan(fresh, load_rates(), max_samples=3)}
    assert "x " in est["ingest-sam"].basis and "exact" not in est["ingest-sam"].basis
    assert within(est["ingest-sam"].samples, 8, 0.30) and within(est["ingest-imagenet"].samples, 8, 0.30)


def test_status_estimate_prints_a_table_with_totals_and_the_rate_card(made, tmp_path):
    from flows.cli import app

    done, _ = made
    path = pipeline_yaml(tmp_path, done.output_root, *_sources_and_models(done))
    result = CliRunner().invoke(app, ["status", str(path), "rates.train_256=100", "--estimate"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "bare-model rates of one NVIDIA H100 80GB HBM3" in result.output
    header = next(i for i, line in enumerate(lines) if line.split()[:5] == ["step", "samples", "bytes", "GPU-hours",
                                                                           "basis"])
    rows = {line.split()[0]: line for line in lines[header + 1:]}
    assert set(rows) >= {"ingest-sam", "caption-sam", "extract-sam-256", "train-stage1", "total"}
    assert rows["ingest-sam"].split()[1:4] == ["8", *human_bytes(
        measure_plan(done)["ingest-sam"].bytes).split()]  # exact: the committed manifests
    assert rows["train-stage1"].split()[1] == "8" and human_hours(8 / 100 / 3600) in rows["train-stage1"]
    bad = CliRunner().invoke(app, ["status", str(path), "rates.train_265=1", "--estimate"])
    assert bad.exit_code == 2 and "did you mean 'rates.train_256'" in bad.output


def _sources_and_models(cfg: PipelineConfig) -> tuple[dict, dict]:
    sam, imagenet = cfg.datasets["sam"], cfg.datasets["imagenet"]
    return ({"sam": sam.source, "imagenet_wds": imagenet.source, "synset_mapping": imagenet.synset_mapping},
            cfg.models.model_dump())


# ---------------------------------------------------------------------------------------------------------------------
# The demo preset: estimate, run, compare; and the Prefect flow's artifacts
# ---------------------------------------------------------------------------------------------------------------------

DEMO_STEPS = ["ingest-sam", "ingest-imagenet", "caption-sam", "extract-sam-256", "extract-sam-1024",
              "extract-imagenet-256"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo's data steps for SAM and ImageNet, estimated before they run, then run, then measured."""
    from flows.pipeline import demo_inputs, local_runner, run_pipeline

    inputs, root = tmp_path_factory.mktemp("cost-inputs"), tmp_path_factory.mktemp("cost-root")
    cfg = demo_inputs(load_config(PipelineConfig, "demo", [f"output_root={root / 'pixart'}", f"demo_inputs={inputs}",
                                                           f"only=[{','.join(DEMO_STEPS)}]"], kind="pipeline"))
    before = {e.step: e for e in estimate_plan(cfg, load_rates())}
    outcome = run_pipeline(cfg, local_runner(cfg), log=lambda message: None)
    assert outcome.ok, outcome.failed
    return cfg, inputs, before, {r["step"]: r for r in outcome.rows}, measure_plan(cfg)


@pytest.mark.slow
def test_the_demos_estimate_matches_what_its_data_steps_then_wrote(demo_run):
    cfg, _, before, rows, measured = demo_run
    for ds in ("sam", "imagenet"):
        ok = sum(s == "ok" for s in read_dataset(cfg.output_root, ds)["status"].to_pylist())
        assert before[f"ingest-{ds}"].samples == ok == rows[f"ingest-{ds}"]["samples"]
        assert within(before[f"ingest-{ds}"].bytes, measured[f"ingest-{ds}"].bytes, 0.05)
    assert before["caption-sam"].samples == rows["caption-sam"]["samples"] == measured["caption-sam"].samples
    for step in ("extract-sam-1024", "extract-imagenet-256"):  # latents (1024: aspect-ratio buckets)
        assert before[step].samples == rows[step]["samples"] == measured[step].samples
        assert within(before[step].bytes, measured[step].bytes, 0.10), (step, before[step], measured[step])
    assert measured["extract-sam-256"].bytes <= before["extract-sam-256"].bytes < 2 * measured["extract-sam-256"].bytes
    after = {e.step: e for e in estimate_plan(cfg, load_rates())}
    assert within(after["extract-sam-256"].bytes, measured["extract-sam-256"].bytes, 0.10)


@pytest.mark.slow
def test_the_flow_publishes_the_estimate_before_and_the_comparison_after(demo_run, prefect_server, tmp_path):
    from flows.pipeline_flow import pixart_pipeline
    from tests.artifacts import run_artifacts

    inputs = demo_run[1]
    state = pixart_pipeline(config="demo", output_root=str(tmp_path / "pixart"), only=["ingest-imagenet"],
                            overrides=[f"demo_inputs={inputs}", "rates.train_256=100"], return_state=True)
    assert state.is_completed(), state.message
    found = run_artifacts(state, ["pixart-pipeline-estimate", "pixart-pipeline-summary"])
    estimate, summary = found["pixart-pipeline-estimate"].data, found["pixart-pipeline-summary"].data
    assert "| step | samples | bytes | GPU-hours | basis |" in estimate and "NVIDIA H100" in estimate
    assert "| ingest-imagenet | 8 |" in estimate and "PixArt-XL/2 100/s at 256" in estimate
    assert "| ingest-imagenet | done | 8 | 0 |" in summary  # the run's own table, then estimated vs measured
    assert "Estimated vs measured" in summary and "| ingest-imagenet | 8 | 8 |" in summary


@pytest.mark.slow
def test_the_summary_counts_an_extract_steps_images_once_and_names_its_features(demo_run):
    """extract-sam-256 writes a text row and a latents row per image: 8 images are 8 samples, not 16."""
    from flows.pipeline import PipelineOutcome, summary_table

    cfg, _, _, rows, _ = demo_run
    assert rows["ingest-sam"]["samples"] == 8
    assert rows["extract-sam-256"]["samples"] == 8, rows["extract-sam-256"]
    assert rows["extract-sam-256"]["features"] == "8 text, 8 latents samples"
    assert rows["extract-sam-1024"]["samples"] == 8 and rows["extract-sam-1024"]["features"] == "8 latents samples"
    table = summary_table(PipelineOutcome(rows=list(rows.values())), cfg)
    assert "| extract-sam-256 | done | 8 | 0 |" in table, table

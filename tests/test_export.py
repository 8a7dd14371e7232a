"""Sample grids and diffusers exports of tiny trained checkpoints, on CPU: they load in diffusers and generate."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pixart.export import ExportError, export
from pixart.models import ModelConfig, build_pixart
from pixart.train import checkpoint
from pixart.train.diffusion import IDDPM
from pixart.train.prepare import prepare_run
from pixart.train.sampling import LABEL_HEIGHT, make_scheduler, sample_text, save_samples
from pixart.train.trainer import Trainer
from storage.errors import PipelineError
from tests.test_train import config

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def stage2(features, tiny_t5_encoder, tiny_vae):
    """A tiny stage-2 run trained to its end (4 steps); (trainer, url of its last checkpoint)."""
    cfg = config(features, "tiny-stage2", "export-stage2", t5=tiny_t5_encoder, vae=tiny_vae)
    prepare_run(cfg)
    trainer = Trainer(cfg)
    list(trainer.fit())
    return trainer, checkpoint.latest(features, "export-stage2")


def tiny_components(t5: str, vae: str) -> dict:
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel

    return {"text_encoder": T5EncoderModel.from_pretrained(t5), "tokenizer": AutoTokenizer.from_pretrained(t5),
            "vae": AutoencoderKL.from_pretrained(vae)}


def generate(pipe, side: int, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(num_inference_steps=2, height=side, width=side, use_resolution_binning=False, clean_caption=False,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def test_scheduler_is_dpm_solver_pp_on_the_training_schedule():
    s = make_scheduler()
    assert (s.config.algorithm_type, s.config.solver_order, s.config.prediction_type) == ("dpmsolver++", 2, "epsilon")
    assert s.config.variance_type is None  # diffusers' learned_range keeps [:, :3]; the pipelines split ε themselves
    assert torch.allclose(s.alphas_cumprod.double(), IDDPM().alphas_cumprod, rtol=1e-5)


def test_export_loads_in_diffusers_and_generates(stage2, tiny_t5_encoder, tiny_vae, tmp_path):
    from diffusers import PixArtAlphaPipeline

    trainer, ckpt = stage2
    out = export(ckpt, str(tmp_path / "plain"))
    index = json.loads((Path(out) / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline"
    assert index["text_encoder"] == index["tokenizer"] == index["vae"] == [None, None]
    with pytest.raises(ValueError, match="expected .* but only"):
        PixArtAlphaPipeline.from_pretrained(out)  # unbundled: the T5 and the VAE must be passed
    pipe = PixArtAlphaPipeline.from_pretrained(out, **tiny_components(tiny_t5_encoder, tiny_vae))
    side = pipe.transformer.config.sample_size * 8
    image = generate(pipe, side, prompt="a red fox")
    assert image.shape == (1, side, side, 3) and np.isfinite(image).all()

    # the training grid's first tile is what the export makes of the same prompt (T5 features vs. the prompt)
    c = trainer.conditions
    tile = sample_text(trainer.ema, pipe.vae, c.prompt_text[:1], c.prompt_mask[:1], c.null_text, c.null_mask,
                       steps=2, seed=0)[0]
    assert np.abs(np.asarray(tile, dtype=np.int16) - np.round(image[0] * 255).astype(np.int16)).max() <= 1

    full = export(ckpt, str(tmp_path / "full"), bundle=True)
    alone = PixArtAlphaPipeline.from_pretrained(full)
    assert {p.name for p in Path(full).iterdir()} >= {"text_encoder", "tokenizer", "vae", "README.md"}
    assert np.array_equal(generate(alone, side, prompt="a red fox"), image)


def test_exported_transformer_is_the_ema_or_the_model(stage2, tmp_path):
    from diffusers import PixArtTransformer2DModel

    trainer, ckpt = stage2
    ema, raw = (load_file(f"{ckpt}/{d}/{WEIGHTS}") for d in ("ema", "transformer"))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # 4 steps at decay 0.99: they differ
    for use_ema, want in ((True, ema), (False, raw)):
        out = export(ckpt, str(tmp_path / f"ema-{use_ema}"), use_ema=use_ema)
        got = PixArtTransformer2DModel.from_pretrained(f"{out}/transformer").state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        info = json.loads((Path(out) / "pixart_export.json").read_text())
        assert info["weights"] == ("ema" if use_ema else "transformer") and info["step"] == 4
        assert (info["t5_model"], info["vae_model"]) == (trainer.cfg.t5_model, trainer.cfg.vae_model)
        assert "interpolation_scale 1.0" in (Path(out) / "README.md").read_text()
    assert all(torch.equal(v, ema[k]) for k, v in trainer.ema.state_dict().items())


def test_an_export_starts_the_next_stage_only_with_the_weights_asked_for(stage2, tmp_path):
    """init_weights=model (default, the official load_from) from an EMA export is refused, naming the checkpoint
    to start from; with init_weights=ema it starts from the EMA; an export made with weights=model starts a default run
    from the trained weights. The run's log names the weights and the file."""
    trainer, ckpt = stage2
    ema, raw = (load_file(f"{ckpt}/{d}/{WEIGHTS}") for d in ("ema", "transformer"))
    outs = {w: export(ckpt, str(tmp_path / w), use_ema=(w == "ema")) for w in ("ema", "model")}

    def started(out: str, *update: tuple[str, str]) -> tuple[dict, list[str]]:
        cfg = trainer.cfg.model_copy(update={"run": f"export-init-{len(update)}", "init": out, **dict(update)})
        prepare_run(cfg)
        nxt, said = Trainer(cfg), []
        nxt.resume(log=said.append)
        return nxt.model.state_dict(), said

    with pytest.raises(PipelineError, match=f"holds the EMA weights of {ckpt}.*init_weights=model"):
        started(outs["ema"])  # refused by the driver's check, before anything is written
    for out, update, want, what in ((outs["ema"], [("init_weights", "ema")], ema, "the EMA weights of export"),
                                    (outs["model"], [], raw, "the trained (model) weights of export")):
        state, said = started(out, *update)
        assert all(torch.equal(v, want[k]) for k, v in state.items())
        assert len(said) == 1 and what in said[0] and f"{out}/transformer/{WEIGHTS}" in said[0], said
    with pytest.raises(PipelineError, match="holds the trained \\(model\\) weights"):
        started(outs["model"], ("init_weights", "ema"))


def test_save_samples_writes_a_deterministic_grid(stage2, monkeypatch):
    trainer, _ = stage2
    url = save_samples(trainer, 4)
    assert url.endswith("runs/export-stage2/samples/step-000000004.png")
    first = Path(url).read_bytes()
    assert Image.open(io.BytesIO(first)).size == (2 * 256, 256 + LABEL_HEIGHT)  # two prompts, 256 px tiles, labelled
    vae = trainer._sample_vae
    assert save_samples(trainer, 4) == url and Path(url).read_bytes() == first and trainer._sample_vae is vae
    monkeypatch.setattr(trainer, "ema", None)  # no EMA: the model itself, back in train mode afterwards
    assert Path(save_samples(trainer, 5)).read_bytes() != first and trainer.model.training
    monkeypatch.setattr(trainer, "rank", 1)
    assert save_samples(trainer, 6) is None


def test_stage1_samples_classes_and_exports_a_dit_pipeline(features, tiny_vae, tmp_path):
    from diffusers import AutoencoderKL, DiTPipeline

    cfg = config(features, "tiny-stage1", "samples-stage1", vae=tiny_vae)
    prepare_run(cfg)
    trainer = Trainer(cfg)
    list(trainer.fit())
    url = save_samples(trainer, trainer.step)
    first = Path(url).read_bytes()
    assert Image.open(io.BytesIO(first)).size == (2 * 256, 2 * (256 + LABEL_HEIGHT))  # four classes, 2 x 2
    assert Path(save_samples(trainer, trainer.step)).read_bytes() == first
    out = export(checkpoint.latest(features, "samples-stage1"), str(tmp_path / "dit"))
    pipe = DiTPipeline.from_pretrained(out, vae=AutoencoderKL.from_pretrained(tiny_vae))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(class_labels=[207], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 256, 256, 3) and np.isfinite(image).all()


def test_multi_scale_models_get_micro_conditions_off_1024(tiny_vae, monkeypatch):
    """The pipeline passes micro-conditions only at latent side 128; the own loop that covers other sizes is the
    pipeline's loop otherwise (forced on a plain model, whose embedder ignores them: the images are equal)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae)
    torch.manual_seed(0)
    text, mask = torch.randn(2, 120, 32), (torch.arange(120) < torch.tensor([[7], [3]])).long()
    null, null_mask = torch.randn(120, 32), (torch.arange(120) < 1).long()
    plain = build_pixart(ModelConfig(preset="pixart-tiny"), 256, caption_channels=32).eval()
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    via_pipeline = sample_text(plain, vae, text, mask, null, null_mask, steps=3, seed=1)
    monkeypatch.setattr(plain, "use_additional_conditions", True)
    own = sample_text(plain, vae, text, mask, null, null_mask, steps=3, seed=1)
    assert [np.asarray(a).tobytes() for a in via_pipeline] == [np.asarray(b).tobytes() for b in own]

    ms = build_pixart(ModelConfig(preset="pixart-tiny", multi_scale=True), 512, caption_channels=32).eval()
    images = sample_text(ms, vae, text, mask, null, null_mask, steps=2, resolution=256, seed=1)
    assert [im.size for im in images] == [(256, 256)] * 2


def test_export_refuses_to_replace_another_export_without_force(stage2, tmp_path):
    _, ckpt = stage2
    out = str(tmp_path / "e")
    export(ckpt, out)
    stamp = (Path(out) / "pixart_export.json").stat().st_mtime_ns
    assert export(ckpt, out) == out and (Path(out) / "pixart_export.json").stat().st_mtime_ns == stamp  # a no-op
    with pytest.raises(ExportError, match=r"already holds an export of .*step 4, ema weights.*--force"):
        export(ckpt, out, use_ema=False)
    export(ckpt, out, use_ema=False, force=True)
    assert json.loads((Path(out) / "pixart_export.json").read_text())["weights"] == "transformer"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not an export"):
        export(ckpt, str(notes), force=True)
    assert (notes / "todo.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "notes"]  # no temporaries left


def test_missing_or_uncommitted_checkpoint_is_named(stage2, tmp_path):
    _, ckpt = stage2
    missing = ckpt.replace("step-000000004", "step-000000099")
    with pytest.raises(ExportError, match=f"checkpoint {missing} does not exist"):
        export(missing, str(tmp_path / "x"))
    uncommitted = str(tmp_path / "step-000000007")
    shutil.copytree(ckpt, uncommitted)
    with pytest.raises(ExportError, match=f"{uncommitted} is not a committed checkpoint: no {uncommitted}.done"):
        export(uncommitted, str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _committed_copy(ckpt: str, where: Path) -> Path:
    """A copy of a committed checkpoint (directory and marker) that a test may damage."""
    copy = where / "checkpoints" / Path(ckpt).name
    shutil.copytree(ckpt, copy)
    shutil.copyfile(f"{ckpt}.done", f"{copy}.done")
    return copy


def test_a_corrupt_ema_is_refused_and_nothing_is_published(stage2, tmp_path):
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from flows.cli import app

    _, ckpt = stage2
    copy = _committed_copy(ckpt, tmp_path)
    weights = copy / "ema" / WEIGHTS
    good = weights.read_bytes()
    out = tmp_path / "out"
    weights.write_bytes(good[: len(good) // 2])  # a torn copy: the header promises more than the file holds
    with pytest.raises(ExportError, match=f"{weights}"):
        export(str(copy), str(out))
    state = load_file(f"{ckpt}/ema/{WEIGHTS}")
    state.pop(sorted(state)[0])
    save_file(state, str(weights))  # readable, but not the model its config describes
    with pytest.raises(ExportError, match="missing: "):
        export(str(copy), str(out))
    result = CliRunner().invoke(app, ["export", "pipeline", f"checkpoint={copy}", f"out={out}"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # no export, no temporaries


def test_cli_export_names_the_force_flag(stage2, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    _, ckpt = stage2
    out = str(tmp_path / "e")
    args = ["export", "pipeline", f"checkpoint={ckpt}", f"out={out}"]
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, [*args, "weights=model"])
    assert again.exit_code == 2 and "--force" in again.output and "force=True" not in again.output, again.output
    assert CliRunner().invoke(app, [*args, "weights=model", "--force"]).exit_code == 0

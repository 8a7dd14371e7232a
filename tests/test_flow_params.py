"""The stage flows' typed deployment parameters: what the Prefect UI's form shows (types, enums, descriptions) and how
each given one lands in the config (free-text overrides still win). No Prefect server: the flow bodies run with
`run_as_flow` replaced by a recorder, and the configs are loaded as the stages load them."""

from __future__ import annotations

import pytest

import flows.caption
import flows.extract
import flows.ingest
import flows.train
from captioning.config import CaptionConfig
from pixart.features.config import ExtractConfig
from pixart.train.config import TrainConfig
from storage.configio import load_config
from storage.ingest.config import IngestConfig

INT, STR, STRS = [{"type": "integer"}], [{"type": "string"}], [{"items": {"type": "string"}, "type": "array"}]
REDO = [{"enum": ["stale", "errors"], "type": "string"}]
EXECUTOR = [{"enum": ["local", "ray"], "type": "string"}]
TYPED = {
    flows.ingest.ingest: {"source": STR, "annotations": STR, "synset_mapping": STR, "output_root": STR,
                          "max_shards": INT, "shards": STRS, "redo": REDO, "workers": INT},
    flows.caption.caption: {"output_root": STR, "caption_set": STR, "model": STR, "executor": EXECUTOR,
                            "batch_size": [{"type": "integer"}, {"const": "auto", "type": "string"}],
                            "max_shards": INT, "shards": STRS, "redo": REDO},
    flows.extract.extract: {"output_root": STR, "caption_set": STR, "text_batch_size": INT, "image_batch_size": INT,
                            "executor": EXECUTOR, "max_shards": INT, "shards": STRS, "redo": REDO},
    flows.train.train: {"init": STR, "output_root": STR, "run": STR, "caption_set": STR, "max_steps": INT,
                        "batch_size": INT, "executor": EXECUTOR, "num_workers": INT},
}


@pytest.mark.parametrize("flow", list(TYPED), ids=lambda f: f.name)
def test_stage_flows_have_typed_optional_parameters_with_descriptions(flow):
    schema = flow.parameters.model_dump()
    props = schema["properties"]
    assert {"config", "overrides"} <= set(props)  # the old parameters still work
    assert not schema.get("required")  # every parameter has a default: a deployment runs with none given
    for name, types in TYPED[flow].items():
        assert props[name]["anyOf"] == [*types, {"type": "null"}], name  # typed, and empty keeps the preset's
        assert props[name]["default"] is None, name
        assert len(props[name].get("description") or "") > 15, name  # shown under the field in the UI's form


def recorded(module, monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(module, "run_as_flow", lambda stage, config, overrides, force: calls.append(
        (config, overrides, force)))
    return calls


def test_ingest_caption_and_extract_parameters_resolve_into_their_configs(monkeypatch, tmp_path):
    root = str(tmp_path / "out")
    calls = recorded(flows.ingest, monkeypatch)
    flows.ingest.ingest.fn(config="sam", source=str(tmp_path), output_root=root, max_shards=3,
                           shards=["sa_000001"], redo="errors", workers=5, overrides=["workers=6"])
    config, overrides, force = calls[-1]
    cfg = load_config(IngestConfig, config, overrides, kind="ingest")
    assert (cfg.source, cfg.output_root, cfg.max_shards, cfg.shards, cfg.redo) == (
        str(tmp_path), root, 3, ["sa_000001"], "errors")
    assert cfg.workers == 6 and force is False  # the free-text override wins over the typed field

    calls = recorded(flows.caption, monkeypatch)
    flows.caption.caption.fn(config="sam", output_root=root, caption_set="123", batch_size="auto", max_shards=1)
    cfg = load_config(CaptionConfig, *calls[-1][:2], kind="caption")
    assert (cfg.output_root, cfg.caption_set, cfg.batch_size, cfg.max_shards) == (root, "123", "auto", 1)
    preset = load_config(CaptionConfig, "sam", kind="caption")
    assert (cfg.model, cfg.redo, cfg.executor) == (preset.model, preset.redo, preset.executor)  # None: the preset's
    flows.caption.caption.fn(config="sam", batch_size=4)
    assert load_config(CaptionConfig, *calls[-1][:2], kind="caption").batch_size == 4

    calls = recorded(flows.extract, monkeypatch)
    flows.extract.extract.fn(config="sam-256", output_root=root, caption_set="null", text_batch_size=8,
                             image_batch_size=2, executor="ray", force=True)
    config, overrides, force = calls[-1]
    cfg = load_config(ExtractConfig, config, overrides, kind="extract")
    assert (cfg.output_root, cfg.caption_set, cfg.text_batch_size, cfg.image_batch_size, cfg.executor) == (
        root, "null", 8, 2, "ray")  # a caption set named `null` stays a name
    assert force is True


def test_train_parameters_resolve_into_the_nested_keys(monkeypatch, tmp_path):
    calls = recorded(flows.train, monkeypatch)
    flows.train.train.fn(config="tiny-stage2", init=str(tmp_path / "stage1"), output_root=str(tmp_path),
                         run="typed", caption_set="tiny", max_steps=7, batch_size=3, executor="ray", num_workers=2)
    cfg = load_config(TrainConfig, *calls[-1][:2], kind="train")
    assert (cfg.init, cfg.output_root, cfg.run, cfg.data.caption_set) == (
        str(tmp_path / "stage1"), str(tmp_path), "typed", "tiny")
    assert (cfg.schedule.max_steps, cfg.data.batch_size, cfg.executor, cfg.ray.num_workers) == (7, 3, "ray", 2)
    preset = load_config(TrainConfig, "tiny-stage2", ["data.caption_set=tiny"], kind="train")
    assert cfg.schedule.log_every == preset.schedule.log_every and cfg.optim.lr == preset.optim.lr

    flows.train.train.fn(config="tiny-stage2", max_steps=7, batch_size=3,
                         overrides=["schedule.max_steps=9", "data.caption_set=tiny"])
    cfg = load_config(TrainConfig, *calls[-1][:2], kind="train")
    assert (cfg.schedule.max_steps, cfg.data.batch_size) == (9, 3)  # free text wins, the rest stays typed
    flows.train.train.fn(config="tiny-stage2", overrides=["data.caption_set=tiny"])
    assert load_config(TrainConfig, *calls[-1][:2], kind="train") == preset  # nothing given: the preset as it is

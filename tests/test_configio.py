"""The config system: strict models, presets, dotted overrides, clear errors."""

import importlib
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from storage.configio import _format_validation_error, config_hash, dump_yaml, load_config, parse_overrides
from storage.errors import ConfigError
from storage.ingest.config import IngestConfig


def test_overrides_parse_yaml_values_and_nest():
    assert parse_overrides(["a.b=3", "a.c=true", "d=x y", "e=[1, 2]"]) == {
        "a": {"b": 3, "c": True}, "d": "x y", "e": [1, 2]}


@pytest.mark.parametrize("bad", ["novalue", "=3", "a=[unclosed"])
def test_malformed_override_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_overrides([bad])


def test_preset_plus_overrides():
    cfg = load_config(IngestConfig, "sam", ["source=/x", "decode.max_pixels=1000", "workers=4"], kind="ingest")
    assert (cfg.dataset, cfg.source, cfg.decode.max_pixels, cfg.workers) == ("sam", "/x", 1000, 4)
    assert cfg.decode.verify == "header"


def test_unknown_keys_are_rejected_at_every_level():
    with pytest.raises(ConfigError, match="bogus"):
        load_config(IngestConfig, "sam", ["bogus=1"], kind="ingest")
    with pytest.raises(ConfigError, match="decode.bogus"):
        load_config(IngestConfig, "sam", ["decode.bogus=1"], kind="ingest")


def test_contradictions_raise():
    with pytest.raises(ConfigError, match="annotations"):
        load_config(IngestConfig, "journeydb", ["annotations=null"], kind="ingest")
    with pytest.raises(ConfigError, match="synset_mapping is only used by imagenet"):
        load_config(IngestConfig, "sam", ["synset_mapping=/m.txt"], kind="ingest")


def test_unknown_preset_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="presets: imagenet, journeydb, sam$"):
        load_config(IngestConfig, "nope", kind="ingest")
    with pytest.raises(ConfigError, match="neither a YAML file nor a ingest preset"):  # presets are per command
        load_config(IngestConfig, "caption/sam", kind="ingest")
    with pytest.raises(ConfigError):
        load_config(IngestConfig, "../caption/sam", kind="ingest")
    assert load_config(IngestConfig, "ingest/sam", kind="ingest").dataset == "sam"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(IngestConfig, str(tmp_path / "missing.yaml"))


def test_yaml_file_and_resolved_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: imagenet\nsource: /in\nsynset_mapping: /m.txt\n")
    cfg = load_config(IngestConfig, str(path), ["force=true"])
    again = IngestConfig.model_validate(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg and again.force is True
    assert config_hash(again) == config_hash(cfg) != config_hash(cfg.model_copy(update={"workers": 9}))


def test_misspelled_keys_get_a_did_you_mean_at_every_level():
    with pytest.raises(ConfigError, match=r"  sourc: unknown key; did you mean 'source'"):
        load_config(IngestConfig, "sam", ["sourc=/x"], kind="ingest")
    with pytest.raises(ConfigError, match=r"decode.max_pixel: unknown key; did you mean 'max_pixels'\?"):
        load_config(IngestConfig, "sam", ["source=/x", "decode.max_pixel=3"], kind="ingest")
    with pytest.raises(ConfigError, match=r"decode.zzz: unknown key; this section takes: max_decoded_bytes, "):
        load_config(IngestConfig, "sam", ["source=/x", "decode.zzz=3"], kind="ingest")


def test_own_validator_messages_read_as_written():
    from pixart.train.config import TrainConfig

    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, "stage1", ["stage=2"], kind="train")
    assert str(info.value).splitlines()[1] == "  stage 2 trains PixArt; model.preset 'dit-xl-2' is a DiT"
    assert "(root)" not in str(info.value) and "Value error" not in str(info.value)


def test_every_training_preset_has_the_extraction_preset_its_features_need():
    """A paper stage whose features no extraction preset makes cannot be run from presets alone."""
    from pixart.features.config import ExtractConfig
    from pixart.train.config import TrainConfig
    from storage.configio import CONFIG_DIR

    made = set()
    for path in sorted((CONFIG_DIR / "extract").glob("*.yaml")):
        cfg = load_config(ExtractConfig, path.stem, ["caption_set=any"], kind="extract")
        made.add((cfg.dataset, cfg.base_size, cfg.multi_scale, cfg.what in ("both", "text")))
    for path in sorted((CONFIG_DIR / "train").glob("*.yaml")):
        if path.stem.startswith("tiny-"):
            continue
        stage = load_config(TrainConfig, path.stem, ["data.caption_set=any", "init=/x"] if "stage1" not in path.stem
                            else [], kind="train")
        data = stage.data
        needs_text = data.dataset != "imagenet"
        assert (data.dataset, data.base_size, data.multi_scale, needs_text) in made, path.name


# -- one name per concept, each default defined once ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
# each command's config model
CONFIGS = {"ingest": "storage.ingest.config:IngestConfig", "caption": "captioning.config:CaptionConfig",
           "extract": "pixart.features.config:ExtractConfig", "train": "pixart.train.config:TrainConfig",
           "sample": "pixart.train.config:SampleConfig", "export": "pixart.train.config:ExportConfig",
           "audit": "captioning.audit:AuditConfig", "pipeline": "flows.pipeline_config:PipelineConfig",
           "setup": "flows.setup:SetupConfig"}


def config_class(command: str) -> type:
    module, name = CONFIGS[command].split(":")
    return getattr(importlib.import_module(module), name)


def _default(cls, name: str):
    return cls.model_fields[name].default


def test_the_t5_and_vae_defaults_are_defined_once():
    from captioning.config import CaptionConfig
    from pixart.features.config import ExtractConfig
    from pixart.train.config import DataConfig, TrainConfig
    from storage.config import DEFAULT_MAX_TOKENS, DEFAULT_T5, DEFAULT_VAE

    assert _default(CaptionConfig, "t5_tokenizer") == _default(ExtractConfig, "t5_model") == DEFAULT_T5
    assert _default(TrainConfig, "t5_model") == DEFAULT_T5
    assert _default(ExtractConfig, "vae_model") == _default(TrainConfig, "vae_model") == DEFAULT_VAE
    limits = {_default(CaptionConfig, "max_tokens"), _default(ExtractConfig, "max_tokens"),
              _default(DataConfig, "max_tokens")}
    assert limits == {DEFAULT_MAX_TOKENS}
    for path in ("captioning/config.py", "pixart/features/config.py", "pixart/train/config.py"):
        text = (ROOT / path).read_text()  # imported from storage/config.py, not written again
        assert "t5-v1_1-xxl" not in text and "sd-vae-ft-ema" not in text and not re.search(r"Field\(120\b", text)


def test_one_name_for_the_token_limit_and_the_dtype():
    from captioning.config import CaptionConfig
    from pixart.features.config import ExtractConfig
    from pixart.train.config import DataConfig, TrainConfig

    for cls in (CaptionConfig, ExtractConfig, DataConfig):
        assert "max_tokens" in cls.model_fields and "max_t5_tokens" not in cls.model_fields
    for cls in (CaptionConfig, ExtractConfig, TrainConfig):
        assert "dtype" in cls.model_fields and "precision" not in cls.model_fields


@pytest.mark.parametrize("kind, preset, old, new", [("caption", "sam", "max_t5_tokens", "max_tokens"),
                                                    ("train", "tiny-stage1", "precision", "dtype")])
def test_an_old_key_is_refused_naming_its_new_name(kind, preset, old, new):
    with pytest.raises(ConfigError, match=rf"  {old}: unknown key; renamed to '{new}'$"):
        load_config(config_class(kind), preset, [f"{old}=float32"], kind=kind)


# -- dataset: the source registry decides -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, preset, key, extra", [
    ("ingest", "sam", "dataset", []),
    ("caption", "sam", "dataset", []),
    ("extract", "sam-256", "dataset", ["caption_set=x"]),
    ("train", "stage2", "data.dataset", ["data.caption_set=x"]),
    ("audit", "sam", "dataset", []),
])
def test_every_dataset_field_is_checked_against_the_source_registry(kind, preset, key, extra):
    from storage.ingest.sources import source_names

    with pytest.raises(ConfigError) as info:
        load_config(config_class(kind), preset, [*extra, f"{key}=laion"], kind=kind)
    assert f"  {key}: unknown dataset 'laion'; known: {', '.join(source_names())} " in str(info.value)


def test_a_newly_registered_source_is_a_dataset_everywhere():
    from captioning.config import CaptionConfig
    from pixart.features.config import ExtractConfig
    from storage.ingest.sources.base import _REGISTRY, Source, register

    register(type("LaionSource", (Source,), {"name": "laion"}))
    try:
        assert CaptionConfig(dataset="laion").dataset == "laion"
        assert ExtractConfig(dataset="laion", caption_set="x").dataset == "laion"
    finally:
        _REGISTRY.pop("laion")


# -- each command's config holds only what it reads -------------------------------------------------------------------

def test_training_and_its_tools_have_no_shard_stage_keys():
    from captioning.audit import AuditConfig
    from captioning.config import CaptionConfig
    from pixart.features.config import ExtractConfig
    from pixart.train.config import ExportConfig, SampleConfig, TrainConfig

    shard_keys = {"max_shards", "force", "create_bucket"}
    for cls in (IngestConfig, CaptionConfig, ExtractConfig):
        assert shard_keys <= set(cls.model_fields)
    for cls in (TrainConfig, SampleConfig, AuditConfig):
        assert not shard_keys & set(cls.model_fields), cls
    assert set(ExportConfig.model_fields) & shard_keys == {"force"}  # replaces another export: it reads it
    with pytest.raises(ConfigError, match=r"  force: unknown key"):
        load_config(TrainConfig, "tiny-stage1", ["force=true"], kind="train")


def test_the_ray_sections_share_one_base():
    from captioning.config import CaptionConfig, RayCaptionConfig
    from pixart.features.config import ExtractConfig, RayExtractConfig
    from pixart.train.config import RayTrainConfig, TrainConfig
    from storage.config import RayConfig, RayDataConfig

    def own(cls) -> set[str]:
        return set(cls.__dict__.get("__annotations__", {}))

    for cfg, ray in ((CaptionConfig, RayCaptionConfig), (ExtractConfig, RayExtractConfig),
                     (TrainConfig, RayTrainConfig)):
        assert cfg.model_fields["ray"].annotation is ray and issubclass(ray, RayConfig)
        assert "address" in ray.model_fields and "address" not in own(ray)  # declared once, in RayConfig
    for ray in (RayCaptionConfig, RayExtractConfig):  # the two Ray Data pools share their decoder and GPU fields
        assert issubclass(ray, RayDataConfig) and not own(ray) & set(RayDataConfig.model_fields)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_every_preset_loads(kind):
    from storage.configio import preset_names

    needs = {"extract": ["caption_set=x"], "sample": ["checkpoint=/c"], "export": ["checkpoint=/c", "out=/o"],
             "pipeline": ["datasets.sam.source=/a", "datasets.journeydb.source=/b", "datasets.imagenet.source=/c"]}
    names = preset_names(kind)
    assert names
    for name in names:
        extra = ["data.caption_set=x"] if kind == "train" and "stage1" not in name else needs.get(kind, [])
        load_config(config_class(kind), name, extra, kind=kind)


def test_misspelled_keys_under_dict_valued_sections_get_a_did_you_mean():
    from pydantic import ConfigDict

    from flows.pipeline_config import PipelineConfig

    class Leaf(BaseModel):
        model_config = ConfigDict(extra="forbid")
        caption: bool = False
        overrides: list[str] = []

    class Top(BaseModel):
        model_config = ConfigDict(extra="forbid")
        by_name: dict[str, Leaf] = {}
        maybe: dict[str, Leaf] | None = None
        listed: list[Leaf] = []

    cases = [(Top, ["by_name.a.captoin=true"], r"by_name.a.captoin: unknown key; did you mean 'caption'\?"),
             (Top, ["maybe.x.overides=[a]"], r"maybe.x.overides: unknown key; did you mean 'overrides'\?"),
             (PipelineConfig, ["datasets.sam.captoin=true"],
              r"datasets.sam.captoin: unknown key; did you mean 'caption'\?"),
             (PipelineConfig, ["features.sam-256.overides=[a]"],
              r"features.sam-256.overides: unknown key; did you mean 'overrides'\?"),
             (PipelineConfig, ["train.stage1.preest=x"], r"train.stage1.preest: unknown key; did you mean 'preset'\?"),
             (PipelineConfig, ["train.stage1.zzz=x"], r"train.stage1.zzz: unknown key; this section takes: features")]
    for cls, overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(cls, None, overrides)
    try:  # a list of sections: the index is skipped like a dict key
        Top.model_validate({"listed": [{"captoin": True}]})
    except ValidationError as e:
        assert "listed.0.captoin: unknown key; did you mean 'caption'?" in _format_validation_error(Top, e)
    else:
        raise AssertionError("an unknown key under a list of sections was accepted")

"""The config system: strict models, presets, dotted overrides, clear errors."""

import pytest
import yaml

from storage.configio import config_hash, dump_yaml, load_config, parse_overrides
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

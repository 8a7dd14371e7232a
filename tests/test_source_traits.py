"""What a dataset is (captioned or class-labelled, with or without its own prompts) is said once, by its source
reader: the extraction and captioning configs ask the registry, so a new dataset needs no edits elsewhere."""

import pytest

from captioning.config import CaptionConfig
from pixart.features.config import ExtractConfig
from storage.errors import ConfigError
from storage.ingest.sources import base
from storage.ingest.sources.base import Source, captioned, register


@pytest.fixture
def labelled_source():
    @register
    class Labelled(Source):  # a fourth dataset, class-labelled like ImageNet, under another name
        name = "toy-labels"
        conditioning = "class"

    yield Labelled.name
    base._REGISTRY.pop(Labelled.name)


def test_the_registry_says_which_datasets_are_captioned():
    assert (captioned("sam"), captioned("journeydb"), captioned("imagenet")) == (True, True, False)
    with pytest.raises(ConfigError, match="unknown dataset 'laion'"):
        captioned("laion")


def test_a_new_class_labelled_dataset_extracts_latents_only_without_naming_it_anywhere(labelled_source):
    both = ExtractConfig(dataset=labelled_source, what="both", output_root="/x")
    assert not both.encodes_text  # no caption set needed, no T5 loaded
    assert ExtractConfig(dataset="sam", what="both", output_root="/x", caption_set="c").encodes_text
    with pytest.raises(ValueError, match="toy-labels has class labels, not captions"):
        ExtractConfig(dataset=labelled_source, what="text", output_root="/x")
    with pytest.raises(ValueError, match="text features need caption_set"):
        ExtractConfig(dataset="sam", what="both", output_root="/x")


def test_training_text_from_prompts_needs_a_dataset_that_ships_prompts():
    assert CaptionConfig(dataset="journeydb", training_text="prompt", output_root="/x").training_text == "prompt"
    with pytest.raises(ValueError, match="sam has none"):
        CaptionConfig(dataset="sam", training_text="prompt", output_root="/x")

"""The pipeline's config: one file names the datasets, the models (given once), the storage root and the steps.
Presets live in `configs/pipeline/` (`demo` runs everything offline on sample shards and tiny models).

    pixart pipeline demo output_root=/data/pixart models.t5=/models/t5-v1_1-xxl steps=[ingest,caption]

Each stage keeps its own presets (`configs/ingest/`, `configs/caption/`, ...); a pipeline step names one of them and
adds overrides, and the pipeline fills in what one step hands the next (the caption set, the models, the
checkpoint to start from).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from captioning.config import DEFAULT_MODEL as DEFAULT_LLAVA
from storage.config import DEFAULT_T5, DEFAULT_VAE, check_dataset
from storage.configio import StrictModel

if TYPE_CHECKING:
    from pixart.cost import Rates

STEP_KINDS = ("ingest", "caption", "extract", "train", "export")


class Models(StrictModel):
    """Every model the pipeline loads, as a hub id or a local directory. `tiny`: a tiny random model built offline
    under `demo_inputs` (the demo)."""

    llava: str = Field(DEFAULT_LLAVA, description="LLaVA captioner.")
    t5_tokenizer: str = Field(DEFAULT_T5, description="T5 tokenizer (caption token counts).")
    t5: str = Field(DEFAULT_T5, description="T5 encoder of the text features (and the null caption).")
    vae: str = Field(DEFAULT_VAE, description="VAE of the latents.")


class DatasetSpec(StrictModel):
    """Where one dataset's raw shards are. Empty with `demo_inputs`: the sample shards built there."""

    source: str | None = Field(None, description="Directory, glob, archive or links TSV (see `pixart ingest`).")
    annotations: str | None = Field(None, description="JourneyDB annotation jsonl.")
    synset_mapping: str | None = Field(None, description="ImageNet LOC_synset_mapping.txt.")
    caption: bool = Field(False, description="Caption it with LLaVA (SAM, JourneyDB).")
    overrides: list[str] = Field(default_factory=list, description="Extra ingest key=value overrides.")


class FeatureSpec(StrictModel):
    """One extraction step: a dataset at one resolution."""

    dataset: str
    preset: str = Field(description="An extract preset (configs/extract/), e.g. sam-256.")
    overrides: list[str] = Field(default_factory=list)


class TrainSpec(StrictModel):
    """One training step: a train preset, the features it reads, and the step whose weights start it."""

    preset: str = Field(description="A train preset (configs/train/).")
    features: str = Field(description="The feature step it trains on (a key of `features`).")
    init: str | None = Field(None, description="The train step whose latest checkpoint starts this one (for stage "
                             "2, a stage 1 DiT: re-parameterised to PixArt on load).")
    overrides: list[str] = Field(default_factory=list)


class PipelineConfig(StrictModel):
    """Raw shards -> manifests -> captions -> features -> the three training stages -> a diffusers export."""

    output_root: str = Field("data/pixart", description="Root URL of every output (local path or s3://...).")
    demo_inputs: str | None = Field(None, description="Build sample shards from real photos (and tiny models for "
                                    "`tiny`) under this directory, offline, once.")
    models: Models = Field(default_factory=Models)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict, description="Datasets to ingest, by name (a "
                                             "registered source: storage/ingest/sources/).")
    caption: list[str] = Field(default_factory=list, description="Overrides of every caption step.")
    features: dict[str, FeatureSpec] = Field(default_factory=dict, description="Extraction steps, by name.")
    train: dict[str, TrainSpec] = Field(default_factory=dict, description="Training steps, in order, by name.")
    export: str | None = Field(None, description="The train step to export as a diffusers pipeline.")
    steps: list[Literal["ingest", "caption", "extract", "train", "export"]] = Field(
        list(STEP_KINDS), description="Which kinds of step to run (the others are only checked).")
    only: list[str] = Field(default_factory=list, description="Run only these steps by name (e.g. caption-sam); "
                            "empty: all of `steps`.")
    rate_table: str = Field("h100", description="The per-GPU rates of the cost estimate: a table in configs/rates/ "
                            "or a YAML path.")
    rates: dict[str, float] = Field(default_factory=dict, description="Rates that override the table's, e.g. "
                                    "rates.train_256=250 (samples/s; the keys are those of configs/rates/h100.yaml).")

    def rate_card(self) -> Rates:
        """The estimate's rates: `rate_table` with `rates` applied (PipelineError naming a key it does not have)."""
        from pixart.cost import load_rates

        return load_rates(self.rate_table, [f"{k}={v}" for k, v in self.rates.items()])

    @field_validator("datasets")
    @classmethod
    def _known_datasets(cls, datasets: dict[str, DatasetSpec]) -> dict[str, DatasetSpec]:
        """A dataset without a source reader is refused when the config loads, listing the known ones."""
        for name in datasets:
            check_dataset(name)
        return datasets

    @field_validator("rates")
    @classmethod
    def _known_rates(cls, rates: dict[str, float]) -> dict[str, float]:
        """A misspelt rate is refused when the config loads, named as the user typed it (rates.<key>)."""
        from pixart.cost import Rates

        known = [k for k in Rates.model_fields if k != "card"]
        for key in rates:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
                hint = ("did you mean " + " or ".join(f"'rates.{c}'" for c in close) + "?" if close
                        else "the rates are: " + ", ".join(known))
                raise ValueError(f"rates.{key} is not a rate; {hint}")
        return rates

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        for name, f in self.features.items():
            if f.dataset not in self.datasets:
                raise ValueError(f"features.{name}: dataset {f.dataset!r} is not one of datasets "
                                 f"({', '.join(self.datasets)})")
        for name, t in self.train.items():
            if t.features not in self.features:
                raise ValueError(f"train.{name}: features {t.features!r} is not one of features "
                                 f"({', '.join(self.features)})")
            if t.init is not None and t.init not in self.train:
                raise ValueError(f"train.{name}: init {t.init!r} is not a train step ({', '.join(self.train)})")
        if self.export is not None and self.export not in self.train:
            raise ValueError(f"export: {self.export!r} is not a train step ({', '.join(self.train)})")
        missing = [name for name, spec in self.datasets.items() if spec.source is None]
        if missing and not self.demo_inputs:
            raise ValueError(f"datasets.{missing[0]}.source: fill in where the raw {missing[0]} shards are (a "
                             f"directory, glob or archive; see `pixart ingest --help`)")
        if "tiny" in self.models.model_dump().values() and not self.demo_inputs:
            raise ValueError("models: `tiny` needs demo_inputs=<dir> to build them in")
        return self

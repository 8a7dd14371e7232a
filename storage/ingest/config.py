"""The ingest stage's config: which source reader, where its archives are, how images are checked. Presets live in
`configs/ingest/`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from storage.config import Dataset, DecodeConfig, StageConfig
from storage.lineage import RuntimeField


class IngestConfig(StageConfig):
    """Turn source archives of one dataset into parquet manifests under `<output_root>/manifests/<dataset>/`."""

    dataset: Dataset = Field(description="Which source reader (storage/ingest/sources/): sam (SA-1B), journeydb, "
                             "imagenet.")
    source: str = RuntimeField(  # which archives: their identities are each manifest's lineage inputs
        description="Directory, glob or single archive URL; for sam also the links TSV (file_name<TAB>cdn_link)."
    )
    annotations: str | None = RuntimeField(None,
                                    description="JourneyDB annotation jsonl (.jsonl, .jsonl.gz or .tgz).")
    synset_mapping: str | None = RuntimeField(None,
                                       description="ImageNet LOC_synset_mapping.txt (line number = class).")
    workers: int = RuntimeField(2, gt=0, description="Shards processed concurrently.")
    worker_type: Literal["process", "thread"] = RuntimeField(
        "process", description="process: one process per worker (scales with cores); "
        "thread: in-process threads (no start-up cost, per-image progress)."
    )
    hash: Literal["xxh3_128", "sha256"] = Field(
        "xxh3_128", description="Content hash per image (`hash` column): xxh3_128 (fast) or sha256 (also fills the "
        "`sha256` column, for matching published hash lists).")
    decode: DecodeConfig = Field(default_factory=DecodeConfig)

    @model_validator(mode="after")
    def _check(self) -> IngestConfig:
        from storage.ingest.sources import get_source

        get_source(self.dataset).check(self)  # options this source does not take or lacks
        return self

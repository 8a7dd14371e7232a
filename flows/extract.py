"""Prefect flow `extract`: T5 text features and VAE latents of one dataset, one task per shard.

    prefect deployment run extract/extract-sam-256 -p overrides='["caption_set=llava-1-5-7b-hf-1a2b3c4d"]'

The work is `flows/extract_stage.py` on the stage kit (`flows/_stage.py`), the same code `pixart extract` runs
locally. Artifacts: `extract-<dataset>-progress`, `extract-<dataset>-buckets` (the bucket histogram).
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows._prefect import run_as_flow
from flows.extract_stage import ExtractStage


@flow(name="extract", task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=True)
def extract(config: str = "extract/sam-256", overrides: list[str] | None = None, force: bool = False):
    """Extract features into `<output_root>/features/<dataset>/`.

    Args:
        config: preset name (`sam-256`, `sam-1024`, `journeydb-256`, `journeydb-512`, `journeydb-1024`,
            `imagenet-256`) or a YAML path.
        overrides: `key=value` strings applied after the preset, e.g. `caption_set=<name>`.
        force: redo shards that are already committed.
    """
    return run_as_flow(ExtractStage(), config, overrides, force)

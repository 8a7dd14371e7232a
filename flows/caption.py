"""Prefect flow `caption`: LLaVA captions for every committed manifest shard of SA-1B or JourneyDB.

    prefect deployment run caption/caption-sam -p overrides='["output_root=/data/pixart"]'

The work is `flows/caption_stage.py` on the stage kit (`flows/_stage.py`), the same code `pixart caption` runs
locally. Artifacts: progress, a table of sample captions, and a caption-quality report (also saved as quality.md
beside the captions).
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows._prefect import run_as_flow
from flows.caption_stage import CaptionStage


@flow(name="caption", task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=True)
def caption(config: str = "caption/sam", overrides: list[str] | None = None, force: bool = False):
    """Caption the committed manifests of one dataset into `<output_root>/captions/<dataset>/<caption_set>/`.

    Args:
        config: preset name (`sam`, `journeydb`, `caption/<name>`) or a YAML path.
        overrides: `key=value` strings applied after the preset, e.g. `model=/models/llava-1.5-7b-hf`.
        force: re-caption shards already committed in this caption set.
    """
    return run_as_flow(CaptionStage(), config, overrides, force)

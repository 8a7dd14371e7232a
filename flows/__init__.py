"""Orchestration: Prefect flows, Ray glue and the `pixart` CLI. The only package that imports Prefect or Ray.

The stage kit, free of Prefect: `_stage.py` (config, pending shards, retries, progress, summary, for every stage);
the stages on it: `ingest_stage.py`, `caption_stage.py`, `extract_stage.py`, `train_stage.py`. Executors that only
distribute: `_prefect.py` (shard calls as Prefect tasks, artifacts), `_ray.py` (joining or starting Ray),
`_ray_stage.py` (the one Ray Data runtime), `_ray_train.py` (Ray Train workers). The Prefect flows, one per stage:
`ingest.py`, `caption.py`, `extract.py`, `train.py`. The DAG: `pipeline.py` (plan, lineage, state, summary),
`pipeline_config.py`, `pipeline_cost.py` (estimate and measured cost), `pipeline_flow.py` (the `pixart-pipeline`
flow), `demo.py` (`make demo`: that flow on Prefect's ephemeral API, training on a local Ray). The commands:
`cli.py`, `cli_config.py`, `__main__.py`; one-time cluster setup: `setup.py`.
"""

import os

# Nothing here may reach the network at run time: Prefect's server would otherwise try to send telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

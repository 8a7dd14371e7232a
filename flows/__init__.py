"""Orchestration: Prefect flows, Ray glue and the `pixart` CLI. The only package that imports Prefect or Ray."""

import os

# Nothing here may reach the network at run time: Prefect's server would otherwise try to send telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

"""Joining or starting Ray, the same way for every Ray executor (captioning, extraction, training).

    with ray_session(cfg.ray.address, object_store_memory=300_000_000):
        ...   # Ray is up here

Where: the given address, else RAY_ADDRESS, else a local Ray started here with the given options (object store
cap, dashboard off unless asked, CPUs). Connecting to a cluster passes the address alone: the cluster's resources
are its own. A Ray that is already initialised (a test's, a notebook's) is used as it is and left running; a Ray
started or joined here is shut down on exit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def ray_session(address: str | None = None, *, object_store_memory: int | None = None,
                include_dashboard: bool = False, num_cpus: int | None = None,
                log_to_driver: bool = False) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(address="local", include_dashboard=include_dashboard, object_store_memory=object_store_memory,
                 num_cpus=num_cpus, log_to_driver=log_to_driver)
    try:
        yield
    finally:
        ray.shutdown()

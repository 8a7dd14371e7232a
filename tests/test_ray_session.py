"""flows._ray.ray_session: the one way the Ray executors join or start Ray."""

import pytest

from flows._ray import ray_session

pytestmark = pytest.mark.slow


def test_a_local_ray_gets_the_options_and_is_shut_down_and_a_running_one_is_left(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    with ray_session(object_store_memory=100 * 1024**2, num_cpus=1):
        resources = ray.cluster_resources()
        assert resources["CPU"] == 1 and abs(resources["object_store_memory"] - 100 * 1024**2) < 1024**2
    assert not ray.is_initialized()  # started here: shut down here

    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    try:
        with ray_session("ray://unused:10001"):  # already up: neither joined elsewhere nor stopped
            assert ray.cluster_resources()["CPU"] == 1
        assert ray.is_initialized()
    finally:
        ray.shutdown()

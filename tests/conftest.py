"""Shared fixtures: sample shards built from real photos, and one Prefect test server per session."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from storage.samples import build_samples  # noqa: E402


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> dict:
    """Two shards per dataset, four photos each, in the real SA-1B / JourneyDB / ImageNet layouts."""
    return build_samples(tmp_path_factory.mktemp("raw"), short_side=160)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A temporary Prefect server on a temporary database, shared by the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> str:
    from captioning.tiny import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    from captioning.tiny import make_tiny_t5_tokenizer

    return make_tiny_t5_tokenizer(tmp_path_factory.mktemp("tiny-t5"))

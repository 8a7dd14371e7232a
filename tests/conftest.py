"""Shared fixtures: sample shards built from real photos, one Prefect test server per session, one moto S3 server
per module that asks for it; and the `slow` marker on every test that starts a service.

    pytest -m "not slow"     # the fast inner loop: no Prefect, Ray or S3 server is started
"""

from __future__ import annotations

import functools
import inspect
import os
import re

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A flow run outside `prefect_server` would quietly start a temporary Prefect server of its own (slow, and unmarked);
# with ephemeral mode off it fails at once ("No Prefect API URL provided"), so every flow test uses the fixture.
os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "false")

import pytest  # noqa: E402

from storage.ingest.samples import build_samples  # noqa: E402

# -- The `slow` marker: every test that starts a service --------------------------------------------------------------

# Fixtures that start one (the Prefect test server; the moto S3 server, which s3_client and the S3 tests' bucket
# fixtures build on): pytest lists a test's fixtures transitively, so a test using any of them is caught.
SERVICE_FIXTURES = frozenset({"prefect_server", "prefect_env", "s3_endpoint"})
# A test body that starts Ray itself. Tests that start a service in another way (a Prefect worker, Chromium) carry
# `@pytest.mark.slow` explicitly. `pytest -m "not slow"` must stay a fast loop:
# about 2 minutes on 2 cores.
STARTS_RAY = re.compile(r"\bray\.init\(|\bray_session\(")
# The heaviest of the rest (several seconds each on 2 cores, with `--durations`): whole pipelines, training runs,
# `pixart` commands in subprocesses that import torch, kill -9 and concurrent runs. "file" marks a whole module,
# "file::test" one test with all its parameters. tests/test_layering.py checks that each entry names a test.
HEAVY = frozenset({
    # whole pipelines and trained models
    "test_pipeline.py",  # the demo pipeline end to end, then re-runs after changes
    "test_export.py",  # a stage-2 run trained for the module, exported and loaded into diffusers pipelines
    "test_train.py::test_a_compiled_model_trains_like_the_eager_one",
    "test_train.py::test_a_sharded_dit_trains_like_the_plain_one",
    "test_train.py::test_cli_train_resumes_and_reports",
    "test_train.py::test_finishing_batches_in_the_step_gives_the_same_run",
    "test_train.py::test_init_from_a_run_directory_takes_its_latest_checkpoint_and_says_which_weights",
    "test_train.py::test_an_epoch_that_runs_dry_is_an_error_not_a_hang",
    "test_train.py::test_stage1_dit_then_stage2_from_its_reparameterisation",
    "test_train.py::test_stage1_runs_are_deterministic",
    "test_train.py::test_stage2_steps_checkpoints_and_resumes_exactly",
    "test_train.py::test_stage3_multi_scale_starts_from_stage2_and_feeds_micro_conditions",
    "test_train.py::test_the_readmes_stage2_from_a_stage1_run_directory_works",
    "test_train_corrupt.py::test_a_corrupt_checkpoint_safetensors_is_named_in_one_line",
    "test_train_failures.py::test_a_full_disk_during_a_checkpoint_save_is_one_line",
    "test_train_corrupt.py::test_a_pickled_optimizer_state_is_refused_in_one_line",
    "test_train_failures.py::test_a_resume_applies_a_changed_lr_and_records_it",
    "test_train_failures.py::test_checkpoint_temporaries_of_a_killed_save_are_swept_when_a_run_starts",
    "test_train_failures.py::test_an_unmarked_step_folder_of_a_killed_save_is_replaced_never_kept",
    "test_train_inputs.py::test_a_resume_on_changed_features_is_refused_naming_the_shard",
    "test_train_failures.py::test_metrics_survive_a_kill_next_to_a_checkpoint_commit",
    "test_train_failures.py::test_trainer_json_loader_state_is_the_trained_step_under_prefetch",
    "test_leftovers.py::test_the_trainer_resumes_exactly_across_epochs_that_start_with_carried_leftovers",
    # captioning whole shards, or comparing many generations, with the tiny LLaVA
    "test_captioner.py::test_batch_generation_is_deterministic_and_batch_independent",
    "test_caption_shards.py::test_audit_command_catches_a_duplicate",
    "test_caption_shards.py::test_every_key_gets_one_row_and_bad_images_lose_nothing",
    "test_caption_shards.py::test_journeydb_keeps_prompt_and_caption_and_chooses_training_text",
    "test_caption_shards.py::test_runner_decodes_the_next_shard_ahead",
    "test_engine.py::test_finished_rows_free_their_slot_for_the_next_image",
    "test_engine.py::test_refill_captions_are_byte_identical_to_generate",
    "test_engine.py::test_refill_captions_real_shards_exactly_once_like_generate",
    "test_engine.py::test_refill_deterministic_batches",
    "test_engine.py::test_refill_journeydb_training_text",
    "test_engine.py::test_refill_runner_decodes_the_next_shard_ahead",
    # `pixart` commands in subprocesses (each imports torch), kill -9 and concurrent runs, huge inputs
    "test_features.py::test_extract_command_estimates_runs_and_skips",
    "test_features.py::test_the_drop_policy_turns_extreme_ratios_into_error_rows",
    "test_concurrency.py::test_two_caption_runs_at_once_are_exactly_once",
    "test_concurrency.py::test_two_journeydb_ingests_at_once_both_succeed_and_lose_nothing",
    "test_defects.py::test_corrupt_committed_manifest_is_one_error_line_naming_it",
    "test_leases.py::test_kill_9_during_captioning_then_an_immediate_rerun_is_complete",
    "test_leases.py::test_kill_9_during_extraction_then_an_immediate_rerun_is_complete",
    "test_model_loading.py::test_building_a_captioner_logs_no_torchvision_warning_and_no_progress_bar",
    "test_hostile.py::test_huge_annotation_line_is_one_malformed_line",
    "test_hostile.py::test_huge_member_of_a_tgz_is_streamed_past",
})


@functools.cache
def _starts_ray(function) -> bool:
    try:
        return bool(STARTS_RAY.search(inspect.getsource(function)))
    except (OSError, TypeError):
        return False


def _is_heavy(item) -> bool:
    file = item.path.name
    return file in HEAVY or f"{file}::{getattr(item, 'originalname', item.name)}" in HEAVY


def pytest_collection_modifyitems(config, items):
    for item in items:
        function = getattr(item, "function", None)
        if (SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())) or (function and _starts_ray(function))
                or _is_heavy(item)):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture
def prefect_env(tmp_path):
    """`prefect server start` (UI included) on a free loopback port with a temporary PREFECT_HOME: the environment
    that points at it, for tests that drive the Prefect CLI, a worker or the UI; stopped after the test."""
    from tests.prefect_cli import prefect_cli_server

    with prefect_cli_server(tmp_path) as env:
        yield env


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> str:
    from captioning.tiny import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    from captioning.tiny import make_tiny_t5_tokenizer

    return make_tiny_t5_tokenizer(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def tiny_t5_encoder(tmp_path_factory, tiny_t5):
    from pixart.tiny import make_tiny_t5_encoder

    return make_tiny_t5_encoder(tmp_path_factory.mktemp("tiny-t5-encoder"), tiny_t5)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    from pixart.tiny import make_tiny_vae

    return make_tiny_vae(tmp_path_factory.mktemp("tiny-vae"))


@pytest.fixture(scope="session")
def captioned(samples, tmp_path_factory, tiny_llava, tiny_t5):
    """SA-1B and ImageNet ingested, SA-1B captioned by the tiny LLaVA into the caption set "tiny"."""
    from captioning.captioner import Captioner
    from captioning.config import CaptionConfig
    from captioning.records import ensure_caption_set
    from captioning.runner import caption_shard
    from captioning.text import T5TokenCounter
    from storage.ingest.config import IngestConfig
    from storage.ingest.shard import ingest_shard, list_shards, prepare
    from storage.manifest import committed_manifests

    root = str(tmp_path_factory.mktemp("features-root"))
    for cfg in (IngestConfig(dataset="sam", source=samples["sam"], output_root=root),
                IngestConfig(dataset="imagenet", source=samples["imagenet_wds"], output_root=root,
                             synset_mapping=samples["synset_mapping"])):
        ctx = prepare(cfg)
        for s in list_shards(cfg):
            ingest_shard(s, cfg, ctx)
    cfg = CaptionConfig(dataset="sam", output_root=root, model=tiny_llava, t5_tokenizer=tiny_t5,
                        generation={"max_new_tokens": 12}, caption_set="tiny", batch_size=4)
    ensure_caption_set(cfg)
    captioner, counter = Captioner(cfg), T5TokenCounter(tiny_t5)
    for m in committed_manifests(root, "sam"):
        caption_shard(m, cfg, captioner, counter)
    return root


@pytest.fixture(scope="session")
def features(captioned, tiny_t5_encoder, tiny_vae):
    """`captioned` plus features by the tiny T5 and VAE: sam text + 256 and 512-ms latents, imagenet 256."""
    from pixart.features.config import ExtractConfig
    from pixart.features.encoders import LatentEncoder, TextEncoder
    from pixart.features.extract import extract_latent_shard, extract_text_shard
    from storage.layout import caption_url
    from storage.manifest import committed_manifests

    text, vae = TextEncoder(tiny_t5_encoder), LatentEncoder(tiny_vae)
    for base, ms in ((256, False), (512, True)):
        cfg = ExtractConfig(dataset="sam", output_root=captioned, caption_set="tiny", base_size=base, multi_scale=ms,
                            t5_model=tiny_t5_encoder, vae_model=tiny_vae, image_batch_size=3)
        for m in committed_manifests(captioned, "sam"):
            extract_latent_shard(m, cfg, vae)
            extract_text_shard(caption_url(captioned, "sam", "tiny", m.rsplit("/", 1)[-1][:-8]), cfg, text)
    imagenet = ExtractConfig(dataset="imagenet", what="latents", output_root=captioned, vae_model=tiny_vae)
    for m in committed_manifests(captioned, "imagenet"):
        extract_latent_shard(m, imagenet, vae)
    return captioned


# -- S3 (moto on 127.0.0.1): one server per test module that asks for it ----------------------------------------------


@pytest.fixture
def ingested_sam(samples, tmp_path) -> str:
    """An output root holding the sample SA-1B shards ingested (manifests only): what a caption test starts from."""
    from storage.ingest.config import IngestConfig
    from storage.ingest.shard import ingest_shard, list_shards

    cfg = IngestConfig(dataset="sam", source=samples["sam"], output_root=str(tmp_path / "root"))
    for s in list_shards(cfg):
        ingest_shard(s, cfg)
    return cfg.output_root


@pytest.fixture
def cli_run(features, tiny_t5_encoder, tiny_vae):
    """`pixart train` arguments of a tiny stage-2 run named `run` on the session's features, extra overrides last."""
    def args(run: str, *extra: str) -> list[str]:
        return ["tiny-stage2", f"output_root={features}", f"run={run}", "data.caption_set=tiny",
                f"t5_model={tiny_t5_encoder}", f"vae_model={tiny_vae}", *extra]

    return args


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (free port) with the AWS environment pointed at it; everything restored after."""
    from moto.server import ThreadedMotoServer

    from tests.s3server import ACCESS_KEY, AWS_VARS_TO_CLEAR, SECRET_KEY, clear_s3fs_cache, reset_server

    empty = tmp_path_factory.mktemp("aws-config")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    reset_server(endpoint)  # moto's state is per process: nothing left by another module's server
    with pytest.MonkeyPatch.context() as mp:
        for var in AWS_VARS_TO_CLEAR:
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        # no real ~/.aws files, no instance-metadata lookups (network beyond 127.0.0.1)
        mp.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        clear_s3fs_cache()
        try:
            yield endpoint
        finally:
            clear_s3fs_cache()
            server.stop()


@pytest.fixture(scope="module")
def s3_client(s3_endpoint):
    """A plain boto3 client; it finds the server through AWS_ENDPOINT_URL like s3fs does."""
    import boto3

    client = boto3.client("s3")
    assert client.meta.endpoint_url == s3_endpoint  # botocore honours AWS_ENDPOINT_URL
    return client

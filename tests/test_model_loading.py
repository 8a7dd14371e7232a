"""Loading the LLaVA model and the T5 tokenizer: one clear PipelineError per bad source, no hanging on an unreachable
hub, no torchvision warning or progress bars in batch logs."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captioning.captioner import Captioner, ModelLoadError
from captioning.config import CaptionConfig
from captioning.text import T5TokenCounter
from storage.errors import PipelineError

TOKENIZER_FILES = "(tokenizer.json / tokenizer_config.json)"
NO_TOKENIZER = f"has no tokenizer/processor files {TOKENIZER_FILES}"
UNREACHABLE = "not a local directory, not in the Hugging Face cache, and the hub is unreachable"


def captioner(model: str) -> Captioner:
    return Captioner(CaptionConfig(dataset="sam", model=model, device="cpu"))


def load_error(load, *args) -> str:
    """The message of the ModelLoadError that load(*args) raises; it must be one line."""
    with pytest.raises(ModelLoadError) as e:
        load(*args)
    assert isinstance(e.value, PipelineError)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llava) -> dict[str, str]:
    """Saved models that are not usable LLaVA checkpoints: LLaVA weights without tokenizer files, BERT, T5."""
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("checkpoints")
    weights_only = root / "llava-weights-only"
    weights_only.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(Path(tiny_llava) / name, weights_only / name)
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                         vocab_size=64)).save_pretrained(root / "bert")
    T5ForConditionalGeneration(T5Config(d_model=16, d_ff=16, num_layers=1, num_heads=2, d_kv=8,
                                        vocab_size=64)).save_pretrained(root / "t5")
    return {"weights_only": str(weights_only), "bert": str(root / "bert"), "t5": str(root / "t5")}


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path) -> Path:
    """Offline mode off, the hub endpoint a closed local port, an empty HF cache (returned)."""
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket is closed
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest set HF_HUB_OFFLINE=1 before the import
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


# -- defect 1: a directory that is not a LLaVA checkpoint, or no directory at all --------------------------------


def test_llava_weights_without_tokenizer_files_name_what_is_missing(checkpoints):
    message = load_error(captioner, checkpoints["weights_only"])
    assert message == f"LLaVA model {checkpoints['weights_only']!r} {NO_TOKENIZER}"


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_a_non_llava_checkpoint_is_named_by_its_model_type(checkpoints, kind):
    message = load_error(captioner, checkpoints[kind])
    assert message == (f"LLaVA model {checkpoints[kind]!r} is a {kind!r} model, not an image-text-to-text "
                       f"(LLaVA-family) model")


@pytest.mark.parametrize("kind", ["weights_only", "bert"])
def test_t5_tokenizer_dir_without_tokenizer_files(checkpoints, kind):
    message = load_error(T5TokenCounter, checkpoints[kind])
    assert message == f"T5 tokenizer {checkpoints[kind]!r} has no tokenizer files {TOKENIZER_FILES}"


def test_a_missing_local_path_says_so(tmp_path):
    missing = str(tmp_path / "no" / "such-model")
    assert load_error(captioner, missing) == f"cannot load LLaVA model {missing!r}: no such directory"
    assert load_error(T5TokenCounter, missing) == f"cannot load T5 tokenizer {missing!r}: no such directory"


# -- defect 2: a hub id that is not cached must not wait on retries ------------------------------------------------


def test_uncached_t5_tokenizer_fails_at_once_when_the_hub_is_unreachable(unreachable_hub):
    start = time.monotonic()
    message = load_error(T5TokenCounter, "google/t5-v1_1-xxl")
    assert time.monotonic() - start < 10, "must not spend the hub client's retries on an unreachable hub"
    assert message.startswith(f"cannot load T5 tokenizer 'google/t5-v1_1-xxl': {UNREACHABLE} (")
    assert message.endswith("; pass t5_tokenizer=<local dir>")


def test_uncached_llava_model_fails_at_once_naming_the_model(unreachable_hub):
    start = time.monotonic()
    message = load_error(captioner, "llava-hf/llava-1.5-7b-hf")
    assert time.monotonic() - start < 10
    assert message.startswith(f"cannot load LLaVA model 'llava-hf/llava-1.5-7b-hf': {UNREACHABLE} (")
    assert message.endswith("; pass model=<local dir>")


def test_offline_mode_fails_at_once_without_probing(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    message = load_error(T5TokenCounter, "google/t5-v1_1-xxl")
    assert message == f"cannot load T5 tokenizer 'google/t5-v1_1-xxl': {UNREACHABLE} (offline: HF_HUB_OFFLINE is " \
                      f"set); pass t5_tokenizer=<local dir>"


def test_a_cached_hub_id_loads_without_the_hub(unreachable_hub, tiny_t5):
    repo = unreachable_hub / "models--google--t5-v1_1-xxl"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_t5, repo / "snapshots" / commit)
    (repo / "snapshots" / commit / "config.json").write_text('{"model_type": "t5"}')  # AutoTokenizer reads it too
    start = time.monotonic()
    counter = T5TokenCounter("google/t5-v1_1-xxl")
    assert time.monotonic() - start < 10, "a cached tokenizer must not wait on the hub"
    assert counter(["a cat"])[0] >= 2


# -- defect 3: no torchvision fallback warning, no weight-loading progress bars ---------------------------------------

QUIET_SCRIPT = """
import sys
import transformers
from transformers.utils import logging
from captioning.captioner import Captioner
from captioning.config import CaptionConfig
from captioning.tiny import make_tiny_llava
transformers.CLIPImageProcessor  # the lazy fallback to the PIL backend, which warns without torchvision
model = make_tiny_llava(sys.argv[1])
Captioner(CaptionConfig(dataset="sam", model=model, device="cpu"))
assert logging.is_progress_bar_enabled(), "progress bars must be restored after loading"
print("built")
"""


def test_building_a_captioner_logs_no_torchvision_warning_and_no_progress_bar(tmp_path):
    # A fresh interpreter: both the warning (warning_once, and the lazy module caches the fallback class) and the
    # tqdm state are per process, so an earlier test in this session could hide them.
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run([sys.executable, "-c", QUIET_SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert run.returncode == 0 and "built" in run.stdout, run.stderr
    assert "torchvision" not in run.stderr
    assert "Loading weights" not in run.stderr and "it/s]" not in run.stderr

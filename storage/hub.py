"""Loading a pretrained model from a local directory, the Hugging Face cache or the hub, with one clear error.

    model = from_pretrained(T5EncoderModel.from_pretrained, "DeepFloyd/t5-v1_1-xxl", "T5 encoder", "t5_model")

Every failure is one `ModelLoadError` line that names what failed, its id and why (no such directory, missing
files, not cached while the hub is unreachable). A hub id is looked up in the cache first, so an offline run with a
cached model never touches the network, and an uncached one fails at once instead of after the hub client's ~50 s
of retries. Used by every model the pipeline loads: LLaVA and the T5 tokenizer (captioning), T5 and the VAE
(features), the VAE of sample grids (training, `pixart sample`). Torch-free: `load` is the caller's `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from storage.errors import PipelineError

T = TypeVar("T")
PROBE_SECONDS = 2.0  # a hub that takes longer to accept a TCP connection is not worth the client's ~50 s of retries


class ModelLoadError(PipelineError):
    """A model, tokenizer or processor that cannot be loaded; the message names which one, its id, and why."""


# -- quiet loading ------------------------------------------------------------------------------------------------


class _TorchvisionFallbackFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def silence_torchvision_fallback() -> None:
    """Drop transformers' warning that an image processor falls back to its PIL backend because torchvision is
    missing. On purpose: PyPI's torchvision does not import beside the pinned local torch build, so the PIL backend
    is the one we run; it is slower but works on the CPU decode threads, off the GPU's path. Idempotent."""
    logger = logging.getLogger("transformers.utils.import_utils")  # the logger transformers warns through
    if not any(isinstance(f, _TorchvisionFallbackFilter) for f in logger.filters):
        logger.addFilter(_TorchvisionFallbackFilter())


silence_torchvision_fallback()


@contextmanager
def quiet_progress() -> Iterator[None]:
    """No tqdm bars ("Loading weights", "Loading checkpoint shards", downloads) inside: in batch logs they are
    hundreds of carriage-return lines per model replica. The previous setting comes back afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# -- where a model comes from: local directory, HF cache, or the hub ---------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_unreachable() -> str | None:
    """Why the hub cannot be used right now (offline mode, or no TCP connection within 2 s), or None."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"offline: {var} is set"
    if constants.HF_HUB_OFFLINE:  # read from the environment when huggingface_hub was imported
        return "offline: HF_HUB_OFFLINE is set"
    url = urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")  # the hub client connects through it
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as e:
        return f"no connection to {host}:{port}: {e.strerror or e}"
    return None


# -- what a model is: the identity lineage records beside its name -------------------------------------------------

SMALL_FILE = 4 << 20  # files up to this size (configs, tokenizers) are hashed whole
SAMPLES, SAMPLE_BYTES = 16, 64 << 10  # larger ones (weights): size, safetensors header and 16 spread 64 KiB reads
MAX_HEADER = 64 << 20


def model_identity(name: str) -> str | None:
    """What the model `name` is, for lineage: `dir:<hash>` of a local directory's files, `rev:<commit>` of a hub id
    in the local HF cache, None when that cannot be known offline (a hub id not cached). Two directories with the
    same files have the same identity wherever they are; weights saved again at the same path do not. Large files
    are sampled, not read whole (a retrained or re-initialised model changes every sample; a one-value edit of a
    weight file may not), so the cost is a few MiB per model whatever its size."""
    if os.path.isdir(name):
        root = os.path.realpath(name)
        return "dir:" + _dir_hash(root, _dir_signature(root))
    if _is_hub_id(name):
        return _cached_revision(name)
    return None


def _dir_signature(root: str) -> tuple[tuple[str, int, int], ...]:
    """(relative path, size, mtime) of every file under `root`, hidden folders (.cache, .git) left out."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            st = os.stat(os.path.join(folder, f))  # follows a HF snapshot's links to its blobs
            out.append((os.path.relpath(os.path.join(folder, f), root), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


@lru_cache(maxsize=64)  # keyed by the signature: files touched since are hashed again
def _dir_hash(root: str, signature: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for rel, size, _ in signature:
        digest.update(f"{rel}\0{size}\0".encode())
        with open(os.path.join(root, rel), "rb") as f:
            if size <= SMALL_FILE:
                digest.update(f.read())
                continue
            if rel.endswith(".safetensors"):  # its header: every tensor's name, dtype, shape and offsets
                n = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(n, MAX_HEADER)))
            for i in range(SAMPLES):
                f.seek(i * (size - SAMPLE_BYTES) // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def _cached_revision(name: str) -> str | None:
    """The commit of hub id `name`'s cached snapshot (its `main` ref), read from the cache only."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "model_index.json", "tokenizer_config.json", "preprocessor_config.json"):
        path = try_to_load_from_cache(name, filename)
        if isinstance(path, str) and "snapshots" in Path(path).parts:
            parts = Path(path).parts
            return "rev:" + parts[parts.index("snapshots") + 1]
    return None


def require_files(name: str, what: str, files: tuple[str, ...], label: str) -> None:
    """A local directory must hold at least one of `files`; hub ids are checked by the hub client instead."""
    if os.path.isdir(name) and not any((Path(name) / f).is_file() for f in files):
        raise ModelLoadError(f"{what} {name!r} has no {label} ({' / '.join(files)})")


def from_pretrained(load: Callable[..., T], name: str, what: str, field: str, **kwargs: Any) -> T:
    """`load(name, **kwargs)` (a `from_pretrained`) with every failure turned into one ModelLoadError line naming
    `what` failed. A hub id is tried in the HF cache first; when it is not there and the hub is unreachable it fails
    at once, not after the hub client's retries. `field` is the config field to point the user at."""
    if not os.path.isdir(name) and not _is_hub_id(name):
        raise ModelLoadError(f"cannot load {what} {name!r}: no such directory")
    try:
        if os.path.isdir(name):
            return load(name, **kwargs)
        try:
            return load(name, local_files_only=True, **kwargs)
        except OSError:
            pass  # not (completely) in the cache: the hub must supply the rest
        if reason := hub_unreachable():
            raise ModelLoadError(f"cannot load {what} {name!r}: not a local directory, not in the Hugging Face "
                                 f"cache, and the hub is unreachable ({reason}); pass {field}=<local dir>")
        return load(name, **kwargs)
    except (OSError, ValueError, ImportError) as e:  # unknown id, gated repo, broken checkpoint, missing package
        raise ModelLoadError(f"cannot load {what} {name!r}: {_first_line(e)}") from e



"""Every path under the output root, and the one way a source name becomes a shard name or sample key.

    <root>/manifests/<dataset>/<shard>.parquet (+ .done)                    ingest output, one row per sample
    <root>/manifests/<dataset>/_index/<name>-<content id>/                  dataset-wide indexes (JourneyDB)
    <root>/duplicates/<dataset>.parquet (+ .done)                           keys seen in more than one shard
    <root>/captions/<dataset>/<caption_set>/<shard>.parquet (+ .done)       one caption or error row per manifest key
    <root>/captions/<dataset>/<caption_set>/_parts/<shard>/                 progress of an unfinished shard
    <root>/features/<dataset>/text/<caption_set>/<shard>.tar (+ .parquet index, .done)   T5 features
    <root>/features/<dataset>/latents/<base_size>[-ms]/<shard>.tar (+ .parquet index, .done)   VAE latents
    <root>/runs/<run>/checkpoints/step-<N>/                                 a training run's checkpoints
    <root>/runs/<run>/samples/                                              its sample grids

Names that become paths are checked here (`check_name`), so `..` or `a/b` can never leave the output root.
"""

from __future__ import annotations

import hashlib
import re

from storage.errors import ConfigError
from storage.urls import basename, join

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MAX_NAME = 96  # well under every filesystem's 255-byte limit, with room for suffixes (.parquet.done.tmp-xxxxxxxx)
_ARCHIVE_EXTS = (".tar.gz", ".tgz", ".tar")


def safe_name(text: str) -> str:
    """A file stem and webdataset key ([A-Za-z0-9_-], no dots) that is injective in practice.

    Names that are already safe and short pass unchanged (`sa_000001`). Any other name is sanitised and gets a
    hash of the original, so `sa_000001.x` and `sa_000001_x` stay apart, and a 254-character name is shortened
    instead of failing with ENAMETOOLONG. Shard listings still check for collisions (`check_unique`).
    """
    if text and len(text) <= MAX_NAME and not _UNSAFE.search(text) and not text.startswith(("_", "-")):
        return text
    raw = text.encode("utf-8", "surrogateescape")
    digest = hashlib.sha256(raw).hexdigest()[:10]
    stem = _UNSAFE.sub("_", text).strip("_-")[: MAX_NAME - len(digest) - 1]
    return f"{stem}-{digest}" if stem else f"x-{digest}"


def shard_name_of(url: str) -> str:
    """The shard name of an archive URL: its file name without the archive extension, made safe."""
    stem = basename(url)
    for ext in _ARCHIVE_EXTS:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return safe_name(stem)


def check_unique(named: list[tuple[str, str]], what: str) -> None:
    """Refuse two sources that map to one output name: [(name, source url), ...]."""
    first: dict[str, str] = {}
    for name, url in named:
        if name in first and first[name] != url:
            raise ConfigError(f"{what} {first[name]!r} and {url!r} both map to the name {name!r}; rename one")
        first.setdefault(name, url)


def check_name(what: str, value: str) -> str:
    """A name that becomes one path component (dataset, caption set, stage): no '/', no '..', no leading dot."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value or len(value) > MAX_NAME:
        raise ConfigError(f"{what} {value!r} is not a valid name: letters, digits, '_', '-' and '.' only, "
                          f"not starting with '.' or '-', at most {MAX_NAME} characters")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Manifests (ingest)
# ---------------------------------------------------------------------------------------------------------------------


def manifest_dir(root: str, dataset: str) -> str:
    return join(root, "manifests", check_name("dataset", dataset))


def manifest_url(root: str, dataset: str, shard: str) -> str:
    return join(manifest_dir(root, dataset), f"{shard}.parquet")


def index_dir(root: str, dataset: str, name: str, content_id: str) -> str:
    """A dataset-wide index built once per input content (`content_id`): never replaced, only superseded."""
    return join(manifest_dir(root, dataset), "_index", f"{check_name('index', name)}-{content_id}")


def duplicates_url(root: str, dataset: str) -> str:
    """The dataset's cross-shard duplicate keys: a committed output of its own, so manifests are never rewritten."""
    return join(root, "duplicates", f"{check_name('dataset', dataset)}.parquet")


# ---------------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------------


def captions_dir(root: str, dataset: str) -> str:
    """`captions/<dataset>/`: one folder per caption set."""
    return join(root, "captions", check_name("dataset", dataset))


def caption_set_dir(root: str, dataset: str, caption_set: str) -> str:
    return join(captions_dir(root, dataset), check_name("caption set", caption_set))


def caption_set_record_url(root: str, dataset: str, caption_set: str) -> str:
    """`caption_set.yaml`: what defines a caption set (model, prompt, ...); a set exists once it is written."""
    return join(caption_set_dir(root, dataset, caption_set), "caption_set.yaml")


def caption_url(root: str, dataset: str, caption_set: str, shard: str) -> str:
    return join(caption_set_dir(root, dataset, caption_set), f"{shard}.parquet")


def parts_dir(output_url: str) -> str:
    """Progress of an unfinished shard `<dir>/<shard>.parquet` lives in `<dir>/_parts/<shard>/`."""
    parent, name = output_url.rsplit("/", 1)
    return join(parent, "_parts", name.removesuffix(".parquet"))


def shard_of(url: str) -> str:
    """`.../<shard>.parquet` -> `<shard>`."""
    return basename(url).removesuffix(".parquet")


# ---------------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------------


def features_dir(root: str, dataset: str) -> str:
    """`features/<dataset>/`: text features per caption set, latents per base size."""
    return join(root, "features", check_name("dataset", dataset))


def text_features_dir(root: str, dataset: str, caption_set: str) -> str:
    return join(features_dir(root, dataset), "text", check_name("caption set", caption_set))


def latents_dir(root: str, dataset: str, base_size: int, multi_scale: bool = False) -> str:
    """`latents/<base_size>/` (square crops) or `latents/<base_size>-ms/` (aspect-ratio buckets)."""
    return join(features_dir(root, dataset), "latents", f"{int(base_size)}{'-ms' if multi_scale else ''}")


# ---------------------------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------------------------


def run_dir(root: str, run: str) -> str:
    """`runs/<run>/`: a training run's checkpoints, metrics, samples and export."""
    return join(root, "runs", check_name("run", run))


CHECKPOINTS = "checkpoints"  # the folder of a run directory (or of a copy of one anywhere) holding its checkpoints


def checkpoints_dir(root: str, run: str) -> str:
    return join(run_dir(root, run), CHECKPOINTS)


def checkpoint_url(root: str, run: str, step: int) -> str:
    return join(checkpoints_dir(root, run), f"step-{int(step):09d}")


def samples_dir(root: str, run: str) -> str:
    """`runs/<run>/samples/`: the sample grids, one PNG per sampled step."""
    return join(run_dir(root, run), "samples")

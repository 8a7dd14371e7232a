"""The source protocol and registry, what every source reader yields, and how archives are found.

A source is one module under `storage/ingest/sources/` defining a `Source` subclass registered under its dataset name:

    @register
    class MySource(Source):
        name = "mydataset"
        def list_shards(self, cfg): ...                 # -> [SourceShard]
        def prepare(self, cfg): ...                     # dataset-wide work done once -> JSON-able context
        def iter_samples(self, shard, cfg, ctx): ...    # -> SourceSample per sample (errors included)

Two class attributes say what the dataset is, for every later stage: `conditioning = "class"` (class labels: never
captioned, no T5 features) and `has_prompts = True` (it ships its own prompts). Adding a dataset means that module
(imported in `storage/ingest/sources/__init__.py`) and a preset in `configs/ingest/`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from storage.errors import ConfigError, SourceError
from storage.layout import safe_name, shard_name_of
from storage.urls import describe_error, filesystem, to_url

__all__ = ["Source", "SourceSample", "SourceShard", "captioned", "get_source", "list_archives", "register",
           "safe_name", "shard_name_of", "source_names"]


@dataclass(frozen=True)
class SourceShard:
    """One unit of ingest work: a tar/tgz archive or (ImageNet) one class folder."""

    name: str  # safe file stem for outputs: [A-Za-z0-9_-]
    url: str
    kind: str = "tar"  # "tar" | "folder"


@dataclass
class SourceSample:
    """One sample, or one error row when `error` is set (then `data` may be None)."""

    key: str
    member: str = ""
    data: bytes | None = None
    offset: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # label, wnid, prompt, prompt_raw, caption, json_w/h
    error: str | None = None


class Source:
    """One dataset's reader. Subclasses set `name` and implement the three methods; see the module docstring."""

    name: ClassVar[str] = ""
    conditioning: ClassVar[Literal["caption", "class"]] = "caption"  # class: labels, never captioned or T5-encoded
    has_prompts: ClassVar[bool] = False  # ships its own text prompts (captioning's training_text other than llava)

    def check(self, cfg: Any) -> None:
        """Raise ValueError for options this source does not take or lacks (called by config validation)."""

    def list_shards(self, cfg: Any) -> list[SourceShard]:
        raise NotImplementedError

    def prepare(self, cfg: Any) -> dict[str, Any]:
        return {}

    def iter_samples(self, shard: SourceShard, cfg: Any, ctx: dict[str, Any]) -> Iterator[SourceSample]:
        raise NotImplementedError


_REGISTRY: dict[str, Source] = {}


def register(cls: type[Source]) -> type[Source]:
    _REGISTRY[cls.name] = cls()
    return cls


def source_names() -> list[str]:
    import storage.ingest.sources  # noqa: F401 - importing the package registers every source

    return sorted(_REGISTRY)


def captioned(name: str) -> bool:
    """Whether a dataset is captioned and trained on text (its T5 features exist), rather than on class labels."""
    return get_source(name).conditioning == "caption"


def get_source(name: str) -> Source:
    names = source_names()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown dataset {name!r}; sources: {', '.join(names)}")
    return _REGISTRY[name]


def list_archives(source: str, patterns: tuple[str, ...], what: str) -> list[str]:
    """Archive URLs under a directory (matching `patterns`), from a glob, or a single archive URL."""
    fs, path = filesystem(source)
    try:
        if any(ch in path for ch in "*?["):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = sorted({p for pat in patterns for p in fs.glob(f"{path.rstrip('/')}/{pat}")})
        elif fs.exists(path):
            found = [path]
        else:
            raise SourceError(f"{source}: does not exist")
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - backend errors (auth, network) become one clear line
        raise SourceError(describe_error(source, e)) from None
    if not found:
        raise SourceError(f"{source}: no {what} found (looked for {', '.join(patterns)})")
    return [to_url(fs, p) for p in sorted(found)]

"""`pixart audit`: prove that every manifest key has exactly one caption or error row in a caption set."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from storage.commit import is_done
from storage.config import Dataset, OutputConfig
from storage.errors import ConfigError
from storage.layout import caption_set_dir, caption_set_record_url, caption_url, shard_of
from storage.manifest import committed_manifests, read_manifest
from storage.parquet import read_table
from storage.urls import exists


def audit_caption_set(root: str, dataset: str, caption_set: str) -> dict[str, Any]:
    """Per-shard and total counts of missing, duplicated and unknown keys; `ok` is True only when all are zero."""
    shards, totals = [], {"keys": 0, "rows": 0, "missing": 0, "duplicated": 0, "unknown": 0, "uncommitted": 0}
    for manifest in committed_manifests(root, dataset):
        shard = shard_of(manifest)
        keys = read_manifest(manifest).column("key").to_pylist()
        out = caption_url(root, dataset, caption_set, shard)
        entry = {"shard": shard, "keys": len(keys), "rows": 0, "missing": len(keys), "duplicated": 0, "unknown": 0,
                 "committed": is_done(out)}
        if entry["committed"]:
            got = read_table(out, ["key"]).column("key").to_pylist()
            seen: dict[str, int] = {}
            for k in got:
                seen[k] = seen.get(k, 0) + 1
            entry.update(rows=len(got), missing=len(set(keys) - seen.keys()),
                         duplicated=sum(n - 1 for n in seen.values() if n > 1), unknown=len(seen.keys() - set(keys)))
        else:
            totals["uncommitted"] += 1
        for k in ("keys", "rows", "missing", "duplicated", "unknown"):
            totals[k] += entry[k]
        shards.append(entry)
    ok = bool(shards) and all(totals[k] == 0 for k in ("missing", "duplicated", "unknown", "uncommitted"))
    return {"dataset": dataset, "caption_set": caption_set, "location": caption_set_dir(root, dataset, caption_set),
            "ok": ok, **totals, "shards": shards}


class AuditConfig(OutputConfig):
    """Check a dataset's manifests under output_root and, with caption_set, one of its caption sets. Presets live in
    `configs/audit/`; every name that becomes a path is checked."""

    dataset: Dataset = Field(description="An ingested dataset (sam, journeydb, imagenet).")
    caption_set: str | None = Field(None, description="A caption set under captions/<dataset>/.")

    def check(self) -> None:
        """Refuse a dataset without committed manifests and unknown caption sets (and any name that would leave
        the output root)."""
        if not committed_manifests(self.output_root, self.dataset):
            raise ConfigError(f"no committed manifests for {self.dataset!r} under {self.output_root}")
        if self.caption_set is not None:
            if not exists(caption_set_record_url(self.output_root, self.dataset, self.caption_set)):
                raise ConfigError(f"no caption set {self.caption_set!r} for {self.dataset} under {self.output_root}")

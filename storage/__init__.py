"""Foundation layer: URLs, atomic shard commits, manifests, source readers, safe image decoding.

Depends on stdlib, pyarrow, webdataset, fsspec, pillow and pydantic only: no torch, Prefect or Ray.

Where things are: `urls.py` (every location an fsspec URL), `layout.py` (every path under the output root).
Committing a shard: `commit.py` (atomic publish, done marker last), `lease.py` (one run per shard), `parts.py`
(an unfinished shard's parts), `shard.py` (the one committed-shard writer), `lineage.py` (what an output was made
from). Formats: `parquet.py`, `manifest.py`, `wds.py`, `tarstream.py`, `readers.py`, `hashing.py`. Inputs:
`decode.py` (safe image decoding), `ingest/` (the ingest stage). Configs and errors: `configio.py`, `config.py`,
`errors.py`. Models: `hub.py` (from_pretrained with one clear error), `devices.py` (what "auto" means).
"""

"""The ingest stage: source archives (SA-1B, JourneyDB, ImageNet readers in `sources/`) -> parquet manifests, one
per source shard (`shard.py`), then duplicate keys across shards (`dedupe.py`)."""

"""The ingest stage: source archives (SA-1B, JourneyDB, ImageNet readers in `sources/`) -> parquet manifests, one
per source shard (`shard.py`), then duplicate keys across shards (`dedupe.py`). Its config: `config.py`. Sample
datasets in the real formats from real photographs (tests, demo): `samples.py`; a measured sample of a dataset for
estimates before ingest runs: `sampling.py`."""

"""The bucketed streaming loader: feature shards -> batches of one aspect-ratio bucket, dealt to ranks and
DataLoader workers, read straight from the tars into pooled batch arrays (`loader.py`). Which shards and what their
indexes promise: `index.py`; reading a planned batch and checking it: `collate.py`, over `tar_reads.py`; reading
ahead: `prefetch.py`; sampling the posterior and padding T5 rows (loader or GPU): `finish.py`."""

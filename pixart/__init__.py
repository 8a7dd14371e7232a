"""The PixArt library, in the order a sample meets it: `features/` (T5 and VAE pre-extraction into webdataset
shards), `data/` (the bucketed streaming loader) and `train/` (the loss, the step, checkpoints, stages); shared
by all three: `buckets.py`, `models.py`, `export.py` and `tiny.py` (offline tiny models for tests and the demo)."""

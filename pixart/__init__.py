"""The PixArt library, in the order a sample meets it: `features/` (T5 and VAE pre-extraction into webdataset
shards), `data/` (the bucketed streaming loader) and `train/` (the loss, the step, checkpoints, stages); shared
by all three: `buckets.py`, `model_config.py` (presets, no torch), `models.py` (building and loading them),
`export.py`, `cost.py` (GPU-hours and bytes before a run) and `tiny.py` (offline tiny models for tests and the
demo)."""

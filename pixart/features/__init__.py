"""Feature pre-extraction: T5 text features of a caption shard and VAE latents of a manifest shard, written as
webdataset tars with a parquet index (`format.py` owns that format; `extract.py` builds the samples with the
encoders of `encoders.py`, captions cleaned first as the official code cleans them: `clean.py`). Its config:
`config.py`; bytes before a run: `estimate.py`; bucket histograms: `bucket_report.py`."""

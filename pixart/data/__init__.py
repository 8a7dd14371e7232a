"""The bucketed streaming loader: feature shards -> batches of one aspect-ratio bucket, dealt to ranks and
DataLoader workers, read straight from the tars into pooled batch arrays (`loader.py`)."""

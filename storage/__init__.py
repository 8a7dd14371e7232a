"""Foundation layer: URLs, atomic shard commits, manifests, source readers, safe image decoding.

Depends on stdlib, pyarrow, webdataset, fsspec, pillow and pydantic only: no torch, Prefect or Ray.
"""

"""The feature loader (`pixart/data/loader.py`) on feature shards held in S3 (moto on 127.0.0.1, tests/s3server.py)."""

from pathlib import Path

import pytest
import s3fs
import torch

from pixart.data.index import feature_shards
from pixart.data.loader import BucketedLoader
from storage.errors import SourceError
from tests.s3server import BUCKET, clear_s3fs_cache

pytestmark = pytest.mark.slow


def test_the_loader_reads_feature_shards_from_s3(features, s3_endpoint, s3_client, monkeypatch):
    """Feature shards on S3 give the same batches as on disk; each batch's sample ranges are fetched with one
    concurrent cat_ranges call (exact ranges, no buffered reads per sample)."""
    s3_client.create_bucket(Bucket=BUCKET)
    root = Path(features)
    for path in sorted(root.glob("features/sam/**/*")):
        if path.is_file():
            s3_client.upload_file(str(path), BUCKET, f"loader/{path.relative_to(root).as_posix()}")
    clear_s3fs_cache()
    local = feature_shards(str(root), "sam", 512, multi_scale=True, caption_set="tiny")
    remote = feature_shards(f"s3://{BUCKET}/loader", "sam", 512, multi_scale=True, caption_set="tiny")
    assert [s.name for s in remote] == [s.name for s in local] and remote[0].latents.startswith("s3://")

    import pixart.data.tar_reads as tar_reads

    fetches, gets = [], []
    real_fetch, real_get = tar_reads.TarReader.fetch, s3fs.S3FileSystem._cat_file
    monkeypatch.setattr(tar_reads.TarReader, "fetch",
                        lambda self, ranges: fetches.append(len(ranges)) or real_fetch(self, ranges))

    async def counted(self, path, *args, **kwargs):
        gets.append(path)
        return await real_get(self, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", counted)  # what cat_ranges awaits, once per range
    monkeypatch.setattr(tar_reads, "open_url", lambda *a, **k: pytest.fail("a buffered per-sample read"))
    want = list(BucketedLoader(local, batch_size=2, seed=2, drop_last=False))
    got = list(BucketedLoader(remote, batch_size=2, seed=2, drop_last=False))
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for x, y in zip(want, got, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in ("latents", "text", "mask", "img_hw", "aspect_ratio"))
    samples = sum(len(b["keys"]) for b in got)
    assert fetches[-len(got):] == [2 * len(b["keys"]) for b in got]  # per batch: latent + text range of each
    assert len(gets) == 2 * samples  # exact range requests, nothing else read
    from pixart.data.finish import pad_text

    rows = list(BucketedLoader(remote, batch_size=2, seed=2, drop_last=False, pad_text=False))  # rows for the GPU
    for x, y in zip(want, rows, strict=True):
        text, mask = pad_text(y["text_rows"], y["n_tokens"])
        assert torch.equal(text, x["text"]) and torch.equal(mask, x["mask"])

    s3_client.delete_object(Bucket=BUCKET, Key=f"loader/features/sam/text/tiny/{remote[0].name}.tar")
    clear_s3fs_cache()
    with pytest.raises(SourceError, match=f"{remote[0].name}.tar: reading bytes"):
        list(BucketedLoader(remote, batch_size=8, seed=2, drop_last=False))

"""The storage layer against an S3-compatible server: moto in server mode on 127.0.0.1, reached through s3fs.

s3fs (via aiobotocore/botocore) is pointed at the server with the standard `AWS_ENDPOINT_URL` variable and fake
credentials from the environment, exactly as a real deployment would be configured; nothing here talks to AWS.
The server and client fixtures are in tests/s3server.py (shared with tests/test_loader_s3.py).
"""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
from pathlib import Path

import pytest
import s3fs
from PIL import Image

from storage.commit import DONE_SUFFIX, TMP_MARK, commit_shard, is_done
from storage.errors import SourceError
from storage.ingest.config import IngestConfig
from storage.ingest.samples import build_samples
from storage.ingest.shard import ingest_shard, list_shards
from storage.manifest import STATUS_OK, manifest_url, read_dataset, read_manifest
from storage.urls import exists, filesystem
from tests.s3server import ACCESS_KEY, BUCKET, SECRET_KEY, clear_s3fs_cache, refused_credentials, set_auth

RAW = f"s3://{BUCKET}/raw/sa1b"


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sa1b_local(tmp_path_factory) -> dict:
    """Two small SA-1B tars (3 images each) on local disk, and the expected (width, height) per key."""
    paths = build_samples(tmp_path_factory.mktemp("raw"), short_side=128, per_shard=3, num_shards=2)
    sizes = {}
    for tar_path in sorted(Path(paths["sam"]).glob("sa_*.tar")):
        with tarfile.open(tar_path) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".jpg"):
                    with Image.open(io.BytesIO(tf.extractfile(member).read())) as im:
                        sizes[Path(member.name).stem] = im.size
    assert len(sizes) == 6
    return {"dir": Path(paths["sam"]), "sizes": sizes}


@pytest.fixture(scope="module")
def sa1b_bucket(s3_client, sa1b_local) -> dict:
    """The SA-1B tars uploaded to s3://pixart-test/raw/sa1b/."""
    s3_client.create_bucket(Bucket=BUCKET)
    for tar_path in sorted(sa1b_local["dir"].glob("sa_*.tar")):
        s3_client.upload_file(str(tar_path), BUCKET, f"raw/sa1b/{tar_path.name}")
    clear_s3fs_cache()  # s3fs must not see a listing cached before the upload
    return sa1b_local


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


def test_s3fs_uses_endpoint_from_environment(s3_endpoint):
    fs, path = filesystem(f"s3://{BUCKET}/raw")
    assert isinstance(fs, s3fs.S3FileSystem)
    assert path == f"{BUCKET}/raw"
    client = fs.connect() if fs._s3 is None else fs.s3
    assert client.meta.endpoint_url == s3_endpoint


def test_ingest_s3_to_s3(sa1b_bucket, s3_client):
    out_root = f"s3://{BUCKET}/out"
    cfg = IngestConfig(dataset="sam", source=RAW, output_root=out_root)
    shards = list_shards(cfg)
    assert [s.name for s in shards] == ["sa_000000", "sa_000001"]
    assert [s.url for s in shards] == [f"{RAW}/sa_000000.tar", f"{RAW}/sa_000001.tar"]

    results = [ingest_shard(s, cfg) for s in shards]
    assert [r.skipped for r in results] == [False, False]
    assert [(r.num_ok, r.num_error) for r in results] == [(3, 0), (3, 0)]
    for r in results:
        assert r.output_url == manifest_url(out_root, "sam", r.shard)
        assert r.output_url.startswith("s3://")

    keys = _keys(s3_client, "out/")
    expected_objects = sorted(
        f"out/manifests/sam/{name}.parquet{suffix}"
        for name in ("sa_000000", "sa_000001")
        for suffix in ("", DONE_SUFFIX)
    )
    assert keys == expected_objects, keys
    assert not [k for k in keys if TMP_MARK in k]
    for r in results:
        assert exists(r.output_url) and is_done(r.output_url)
        marker = json.loads(s3_client.get_object(Bucket=BUCKET, Key=f"out/manifests/sam/{r.shard}.parquet.done")
                            ["Body"].read())
        assert marker["num_ok"] == 3 and marker["shard"] == r.shard

    table = read_dataset(out_root, "sam")
    rows = {row["key"]: row for row in table.to_pylist()}
    assert set(rows) == set(sa1b_bucket["sizes"])
    for key, row in rows.items():
        assert row["status"] == STATUS_OK, row
        assert row["error"] is None
        assert (row["width"], row["height"]) == sa1b_bucket["sizes"][key]
        assert row["source_url"] == f"{RAW}/{row['shard']}.tar"
        assert row["dataset"] == "sam"

    # second run: everything is committed, so every shard is skipped and nothing is rewritten
    etags = {k: s3_client.head_object(Bucket=BUCKET, Key=k)["ETag"] for k in keys}
    again = [ingest_shard(s, cfg) for s in list_shards(cfg)]
    assert [r.skipped for r in again] == [True, True]
    assert [(r.num_ok, r.num_error) for r in again] == [(3, 0), (3, 0)]
    assert _keys(s3_client, "out/") == keys
    assert {k: s3_client.head_object(Bucket=BUCKET, Key=k)["ETag"] for k in keys} == etags

    # force: re-ingested, committed again, still no temporary objects
    forced_cfg = cfg.model_copy(update={"force": True})
    forced = [ingest_shard(s, forced_cfg) for s in list_shards(forced_cfg)]
    assert [r.skipped for r in forced] == [False, False]
    assert [(r.num_ok, r.num_error) for r in forced] == [(3, 0), (3, 0)]
    assert _keys(s3_client, "out/") == keys
    assert len(read_dataset(out_root, "sam")) == 6
    for r in forced:
        assert read_manifest(r.output_url).num_rows == 3


def test_commit_on_s3_failure_leaves_nothing(s3_endpoint, s3_client, sa1b_bucket):
    url = f"s3://{BUCKET}/commit-test/shard.parquet"
    seen: list[str] = []

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with commit_shard(url) as tmp_url:
            assert tmp_url.startswith(f"s3://{BUCKET}/commit-test/shard.parquet{TMP_MARK}")
            fs, path = filesystem(tmp_url)
            with fs.open(path, "wb") as f:
                f.write(b"partial data")
            seen.append(tmp_url)
            assert exists(tmp_url)  # the temporary object really was written before the failure
            raise Boom("crash while writing")

    assert len(seen) == 1
    assert _keys(s3_client, "commit-test/") == []
    assert not exists(url)
    assert not exists(seen[0])
    assert not is_done(url)

    # and a clean commit publishes the final object only
    with commit_shard(url) as tmp_url:
        fs, path = filesystem(tmp_url)
        with fs.open(path, "wb") as f:
            f.write(b"complete")
    assert _keys(s3_client, "commit-test/") == ["commit-test/shard.parquet"]
    assert s3_client.get_object(Bucket=BUCKET, Key="commit-test/shard.parquet")["Body"].read() == b"complete"


@pytest.mark.parametrize("form", ["dir", "dir/", "glob", "tar", "links"])
def test_source_forms_on_s3(sa1b_bucket, s3_client, form):
    """Every way of naming SA-1B shards works with s3 URLs, and the shard URLs come back as s3:// URLs."""
    urls = [f"{RAW}/sa_000000.tar", f"{RAW}/sa_000001.tar"]
    if form == "links":
        tsv = "file_name\tcdn_link\n" + "".join(f"{u.rsplit('/', 1)[1]}\t{u}\n" for u in urls)
        s3_client.put_object(Bucket=BUCKET, Key="lists/sa1b_links.tsv", Body=tsv.encode())
    source = {"dir": RAW, "dir/": RAW + "/", "glob": f"{RAW}/sa_*.tar", "tar": urls[0],
              "links": f"s3://{BUCKET}/lists/sa1b_links.tsv"}[form]
    shards = list_shards(IngestConfig(dataset="sam", source=source, output_root=f"s3://{BUCKET}/out-forms"))
    expected = urls[:1] if form == "tar" else urls
    assert [s.url for s in shards] == expected
    assert [s.name for s in shards] == [u.rsplit("/", 1)[1][:-4] for u in expected]


def test_commit_on_s3_removes_stale_temporaries(s3_endpoint, s3_client, sa1b_bucket, monkeypatch):
    """Leftovers of a crashed attempt (`<final>.tmp-*`) older than the stale age are deleted by the next commit."""
    import storage.commit

    monkeypatch.setattr(storage.commit, "STALE_TMP_SECONDS", 0)  # object stores' mtimes cannot be backdated
    url = f"s3://{BUCKET}/stale-test/shard.parquet"
    fs, path = filesystem(url)
    fs.pipe(f"{path}{TMP_MARK}deadbeef", b"left by a crash")
    fs.pipe(f"{path}{DONE_SUFFIX}", b"{}")  # an old marker: removed before the shard is replaced
    with commit_shard(url) as tmp_url:
        assert not is_done(url)
        fs.pipe(filesystem(tmp_url)[1], b"new")
    assert _keys(s3_client, "stale-test/") == ["stale-test/shard.parquet"]


@pytest.mark.parametrize(
    "source",
    [f"s3://{BUCKET}/no/such/prefix", "s3://no-such-bucket-pixart/raw/sa1b", f"s3://{BUCKET}/raw/sa1b/sa_999999.tar"],
)
def test_missing_source_is_a_source_error(sa1b_bucket, source):
    cfg = IngestConfig(dataset="sam", source=source, output_root=f"s3://{BUCKET}/out-missing")
    with pytest.raises(SourceError) as exc:
        list_shards(cfg)
    message = str(exc.value)
    assert source in message
    assert "\n" not in message


def test_missing_shard_object_is_a_source_error(sa1b_bucket):
    """A listed shard whose object vanished before it was read (or a bad URL in a links file)."""
    from storage.ingest.sources.base import SourceShard

    url = f"s3://{BUCKET}/raw/sa1b/sa_424242.tar"
    cfg = IngestConfig(dataset="sam", source=RAW, output_root=f"s3://{BUCKET}/out-missing")
    with pytest.raises(SourceError) as exc:
        ingest_shard(SourceShard(name="sa_424242", url=url), cfg)
    assert url in str(exc.value) and "\n" not in str(exc.value)


BAD_KEY, BAD_SECRET = "AKIAPIXARTUNKNOWN000", "sEcReT/doNotLeak+0123456789abcdefghijklmn"


@pytest.fixture
def rejected_credentials(s3_endpoint, sa1b_bucket):
    """Credentials the server refuses: moto's IAM check is switched on and the access key is unknown to it."""
    with refused_credentials(s3_endpoint, BAD_KEY, BAD_SECRET):
        yield BAD_KEY, BAD_SECRET


def test_rejected_credentials_are_one_line_source_error(rejected_credentials):
    _, secret = rejected_credentials
    cfg = IngestConfig(dataset="sam", source=RAW, output_root=f"s3://{BUCKET}/out-denied")
    with pytest.raises(SourceError) as exc:
        list_shards(cfg)
    message = str(exc.value)
    assert RAW in message
    assert "\n" not in message
    assert "access denied or credentials unusable" in message
    assert secret not in message
    assert secret not in repr(exc.value)
    assert exc.value.__cause__ is None and exc.value.__suppress_context__  # raised `from None`: no botocore chain


def test_rejected_credentials_when_reading_a_shard(rejected_credentials):
    """Opening a listed shard with refused credentials: the reader ingest_shard streams from raises SourceError."""
    from storage.ingest.sources import sa1b
    from storage.ingest.sources.base import SourceShard

    _, secret = rejected_credentials
    url = f"{RAW}/sa_000000.tar"
    with pytest.raises(SourceError) as exc:
        list(sa1b.iter_samples(SourceShard(name="sa_000000", url=url)))
    message = str(exc.value)
    assert url in message and "\n" not in message
    assert "access denied or credentials unusable" in message
    assert secret not in message


def test_unreachable_endpoint_is_one_line_source_error(s3_endpoint, monkeypatch):
    """A closed port on 127.0.0.1 (no retries, short timeouts): the network failure is one SourceError line."""
    with socket.socket() as sock:  # a port that was free a moment ago and has nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    secret = "sEcReT/unreachable+0123456789abcdefghijklm"
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    clear_s3fs_cache()
    try:
        with pytest.raises(SourceError) as exc:
            list_shards(IngestConfig(dataset="sam", source=RAW, output_root=f"s3://{BUCKET}/out-unreachable"))
    finally:
        clear_s3fs_cache()
    message = str(exc.value)
    assert message.startswith(f"{RAW}: ") and "\n" not in message
    assert secret not in message


def test_credentials_restored_after_rejection(s3_endpoint, sa1b_bucket):
    """A rejection leaves no filesystem or setting behind: the server and the good credentials work again. The test
    is refused first itself, so it checks the same thing whichever tests ran before it (or none)."""
    cfg = IngestConfig(dataset="sam", source=RAW, output_root=f"s3://{BUCKET}/out-restored")
    assert len(list_shards(cfg)) == 2  # a filesystem with the good credentials is cached now
    with refused_credentials(s3_endpoint, BAD_KEY, BAD_SECRET):
        with pytest.raises(SourceError, match="access denied or credentials unusable"):
            list_shards(cfg)
    assert len(list_shards(cfg)) == 2
    assert os.environ["AWS_ACCESS_KEY_ID"] == ACCESS_KEY and os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint
    assert filesystem(RAW)[0].s3.meta.endpoint_url == s3_endpoint
    assert set_auth(s3_endpoint, "inf") == "inf"  # IAM checks were switched off again


def test_journeydb_index_and_ingest_on_s3(sa1b_bucket, s3_client, tmp_path):
    """The folder-partitioned annotation index (pyarrow dataset through fsspec) works on s3 too."""
    local = build_samples(tmp_path / "raw", short_side=96, per_shard=2, num_shards=2)
    for f in sorted(Path(local["journeydb"]).glob("*.tgz")):
        s3_client.upload_file(str(f), BUCKET, f"raw/jdb/imgs/{f.name}")
    s3_client.upload_file(local["journeydb_annotations"], BUCKET, "raw/jdb/anno.jsonl.tgz")
    clear_s3fs_cache()
    cfg = IngestConfig(dataset="journeydb", source=f"s3://{BUCKET}/raw/jdb/imgs",
                       annotations=f"s3://{BUCKET}/raw/jdb/anno.jsonl.tgz", output_root=f"s3://{BUCKET}/jdb-out")
    from storage.ingest.shard import prepare

    assert prepare(cfg)["num_records"] == 4
    for shard in list_shards(cfg):
        assert ingest_shard(shard, cfg).num_ok == 2
    rows = read_dataset(cfg.output_root, "journeydb").to_pylist()
    assert len(rows) == 4 and all(r["status"] == STATUS_OK and r["prompt"] for r in rows)
    assert not [k for k in _keys(s3_client, "jdb-out/") if TMP_MARK in k]
    assert prepare(cfg) == prepare(cfg) and any("_index/annotations-" in k and k.endswith(".done")
                                                for k in _keys(s3_client, "jdb-out/"))


def test_a_missing_output_bucket_is_refused_unless_asked_to_create_it(s3_endpoint, s3_client, samples):
    from flows._stage import LocalRuntime, run_stage
    from flows.ingest_stage import IngestStage
    from storage.errors import PipelineError

    args = [f"source={samples['sam']}", "output_root=s3://no-such-bucket-typo/out", "worker_type=thread"]
    with pytest.raises(PipelineError, match="bucket 'no-such-bucket-typo' does not exist"):
        run_stage(IngestStage(), "sam", args, False, LocalRuntime())
    assert "no-such-bucket-typo" not in [b["Name"] for b in s3_client.list_buckets()["Buckets"]]
    clear_s3fs_cache()
    assert run_stage(IngestStage(), "sam", [*args, "create_bucket=true"], False, LocalRuntime()).ok
    assert "no-such-bucket-typo" in [b["Name"] for b in s3_client.list_buckets()["Buckets"]]

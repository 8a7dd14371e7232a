"""Text extraction checks each caption shard against its manifest, and an extract shard that fails on bad input
releases its lease (issue 15, defects 1 and 2). Each caption set here is a test's own, beside the session's "tiny"."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from captioning.records import CAPTION_SCHEMA
from pixart.features.config import ExtractConfig
from pixart.features.encoders import TextEncoder
from pixart.features.extract import LatentShard, TextShard, extract_text_shard, text_files_of
from storage.commit import write_done
from storage.errors import PipelineError
from storage.layout import caption_url, manifest_url
from storage.lease import LEASE_SUFFIX
from storage.parquet import read_rows, write_table


def caption_set(root: str, name: str, edit) -> str:
    """Caption set `name`: shard sa_000001 of "tiny" with its rows edited by `edit(rows) -> rows`, committed."""
    rows = edit(read_rows(caption_url(root, "sam", "tiny", "sa_000001")))
    url = caption_url(root, "sam", name, "sa_000001")
    write_table(rows, url, CAPTION_SCHEMA)
    write_done(url, {})
    return url


def extract(root: str, name: str, url: str, t5: str):
    cfg = ExtractConfig(dataset="sam", what="text", caption_set=name, output_root=root, t5_model=t5, force=True)
    result = extract_text_shard(url, cfg, TextEncoder(t5))
    tar_url, index_url = text_files_of(cfg, "sa_000001")
    with tarfile.open(tar_url) as tf:
        names = [m.name for m in tf if m.isreg()]
    return result, read_rows(index_url), names


def manifest_keys(root: str) -> list[str]:
    return [r["key"] for r in read_rows(manifest_url(root, "sam", "sa_000001"))]


def test_a_duplicated_caption_row_gives_one_error_row_and_no_sample(captioned, tiny_t5_encoder):
    url = caption_set(captioned, "tiny-dup", lambda rows: [*rows, {**rows[2], "text": "another caption"}])
    dup = read_rows(url)[2]["key"]
    result, index, names = extract(captioned, "tiny-dup", url, tiny_t5_encoder)
    assert sorted(r["key"] for r in index) == sorted(manifest_keys(captioned))  # one row per manifest key
    row = next(r for r in index if r["key"] == dup)
    assert row["status"] == "error" and "2 caption rows" in row["error"] and "tiny-dup" in row["error"]
    assert not [n for n in names if n.startswith(dup + ".")] and len(names) == len(set(names)) == 2 * 3
    assert (result.num_ok, result.num_error) == (3, 1)


def test_a_caption_key_not_in_the_manifest_is_not_encoded(captioned, tiny_t5_encoder):
    url = caption_set(captioned, "tiny-stray", lambda rows: [*rows, {**rows[0], "key": "sa_999"}])
    cfg = ExtractConfig(dataset="sam", what="text", caption_set="tiny-stray", output_root=captioned,
                        t5_model=tiny_t5_encoder)
    with pytest.raises(PipelineError, match=r"sa_999.*not in the manifest") as err:
        extract_text_shard(url, cfg, TextEncoder(tiny_t5_encoder))
    assert url in str(err.value)
    tar_url, index_url = text_files_of(cfg, "sa_000001")
    assert not Path(index_url).exists() and not Path(tar_url).exists()
    assert not Path(index_url + LEASE_SUFFIX).exists()


def test_a_manifest_key_without_a_caption_row_becomes_an_error_row(captioned, tiny_t5_encoder):
    url = caption_set(captioned, "tiny-gap", lambda rows: rows[:1] + rows[2:])
    gone = read_rows(caption_url(captioned, "sam", "tiny", "sa_000001"))[1]["key"]
    result, index, names = extract(captioned, "tiny-gap", url, tiny_t5_encoder)
    assert sorted(r["key"] for r in index) == sorted(manifest_keys(captioned))
    row = next(r for r in index if r["key"] == gone)
    assert row["status"] == "error" and "no caption row" in row["error"] and "tiny-gap" in row["error"]
    assert (result.num_ok, result.num_error) == (3, 1)


def test_extract_shards_failing_on_bad_input_leave_no_lease(captioned, tiny_t5_encoder, tmp_path):
    import shutil

    # a committed caption shard whose parquet is garbage
    url = caption_set(captioned, "tiny-garbage", lambda rows: rows)
    Path(url).write_bytes(b"not a parquet file")
    cfg = ExtractConfig(dataset="sam", what="text", caption_set="tiny-garbage", output_root=captioned,
                        t5_model=tiny_t5_encoder)
    with pytest.raises(Exception):  # noqa: B017 - whatever the reader raises; the lease is what this test is about
        TextShard(url, cfg)
    assert not Path(text_files_of(cfg, "sa_000001").index + LEASE_SUFFIX).exists()
    # a manifest that cannot be read, in a root of its own
    bad = tmp_path / "root" / "manifests" / "sam"
    shutil.copytree(Path(captioned) / "manifests" / "sam", bad)
    (bad / "sa_000001.parquet").write_bytes(b"not a parquet file")
    lcfg = ExtractConfig(dataset="sam", what="latents", output_root=str(tmp_path / "root"))
    with pytest.raises(Exception):  # noqa: B017
        LatentShard(str(bad / "sa_000001.parquet"), lcfg)
    assert not list((tmp_path / "root").rglob(f"*{LEASE_SUFFIX}"))

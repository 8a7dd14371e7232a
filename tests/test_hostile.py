"""Hostile containers and records: one bad record fails only itself, and memory stays bounded whatever one input's
size (tar members, pax headers, annotation lines). Hostile images are in tests/test_hostile_images.py.

The memory tests run the ingest in a subprocess and read its peak RSS; every big input is sized so that reading it
whole, as the readers once did, would take well over the 1 GB asserted. Big inputs are built streaming (gzip level
1, or sparse files) so that each test takes seconds.
"""

import gzip
import json
import os
import re
import tarfile
from pathlib import Path

import pytest

from storage.ingest.config import IngestConfig
from storage.ingest.samples import add_member
from storage.ingest.shard import prepare
from storage.ingest.sources.journeydb import iter_annotations
from tests.archives import file_member, sa1b_pair
from tests.hostile import (
    GB,
    GOOD,
    RSS_LIMIT,
    errors,
    ingest_measured,
    ingest_rows,
    ok_keys,
    run_measured,
    write_gnu_tar,
)

# ---------------------------------------------------------------------------------------------------------------------
# 1. Member names that are not UTF-8
# ---------------------------------------------------------------------------------------------------------------------


def test_sa1b_member_name_not_utf8_is_one_error_row(tmp_path):
    (tmp_path / "src").mkdir()
    tar = write_gnu_tar(tmp_path / "src" / "sa_000000.tar", [
        *sa1b_pair(1, GOOD, 90, 60),
        file_member("sa_9\udcff.jpg", GOOD),  # what tarfile makes of the name bytes b"sa_9\xff.jpg"
        *sa1b_pair(2, GOOD, 90, 60),
    ])
    assert b"sa_9\xff.jpg" in tar.read_bytes()
    rows = ingest_rows(IngestConfig(dataset="sam", source=str(tmp_path / "src"), output_root=str(tmp_path / "o")))
    assert ok_keys(rows) == ["sa_1", "sa_2"]
    [(key, error)] = errors(rows).items()
    assert error == r"member name is not valid UTF-8: b'sa_9\xff.jpg'"
    assert rows[key]["member"] == r"sa_9\xff.jpg"  # readable, valid UTF-8, and still tells the bytes apart


def test_imagenet_file_name_not_utf8_is_one_error_row(tmp_path):
    folder = tmp_path / "train" / "n01440764"
    folder.mkdir(parents=True)
    for name in (b"n01440764_1.JPEG", b"n01440764_\xff.JPEG", b"n01440764_3.JPEG"):
        with open(os.fsencode(folder) + b"/" + name, "wb") as f:
            f.write(GOOD)
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n01440764 tench, Tinca tinca\n")
    rows = ingest_rows(IngestConfig(dataset="imagenet", source=str(tmp_path / "train"), synset_mapping=str(mapping),
                                    output_root=str(tmp_path / "o")))
    assert ok_keys(rows) == ["n01440764_1", "n01440764_3"]
    [(key, error)] = errors(rows).items()
    assert error == r"member name is not valid UTF-8: b'n01440764_\xff.JPEG'"
    assert rows[key]["member"] == r"n01440764_\xff.JPEG"


# ---------------------------------------------------------------------------------------------------------------------
# 2. SA-1B JSON that the parser cannot hold
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verify", ["header", "full"])
def test_sa1b_json_too_deep_or_infinite_is_one_error_row(tmp_path, verify):
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    deep_image = b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # the `image` fast path recurses too
    infinite = b'{"image": {"image_id": 4, "width": 1e999, "height": 60, "file_name": "sa_4.jpg"}}'
    (tmp_path / "src").mkdir()
    write_gnu_tar(tmp_path / "src" / "sa_000000.tar", [
        *sa1b_pair(1, GOOD, 90, 60),
        file_member("sa_2.jpg", GOOD), file_member("sa_2.json", deep),
        file_member("sa_3.jpg", GOOD), file_member("sa_3.json", deep_image),
        file_member("sa_4.jpg", GOOD), file_member("sa_4.json", infinite),
        *sa1b_pair(5, GOOD, 90, 60),
    ])
    rows = ingest_rows(IngestConfig(dataset="sam", source=str(tmp_path / "src"), output_root=str(tmp_path / "o"),
                                    decode={"verify": verify}))
    assert ok_keys(rows) == ["sa_1", "sa_5"]
    assert sorted(errors(rows)) == ["sa_2", "sa_3", "sa_4"]
    assert all(e.startswith("malformed JSON: ") for e in errors(rows).values()), errors(rows)


# ---------------------------------------------------------------------------------------------------------------------
# 3. JourneyDB annotation lines that the parser or parquet cannot hold
# ---------------------------------------------------------------------------------------------------------------------


def journeydb_source(tmp_path: Path, names=("aaa", "bbb", "ccc")) -> Path:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    with tarfile.open(imgs / "000.tgz", "w:gz") as tf:
        for name in names:
            add_member(tf, f"000/{name}.jpg", GOOD)
    return imgs


def record(name: str) -> bytes:
    return json.dumps({"img_path": f"./000/{name}.jpg", "prompt": f"{name} --ar 3:2"}).encode()


@pytest.mark.parametrize("bad", [
    b'{"a":' * 200_000 + b"1" + b"}" * 200_000,
    b'{"img_path": "./000/bbb.jpg", "prompt": "\\ud800 a lone surrogate"}',
    b'{"img_path": "./000/bbb.jpg", "prompt": "x", "Task2": {"Caption": "a \\udfff b"}}',
    b'{"img_path": "./000/bbb\\udc80.jpg", "prompt": "x"}',
    b'{"img_path": "./000/bbb.jpg", "prompt": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 bytes
], ids=["nested-200k", "surrogate-prompt", "surrogate-caption", "surrogate-path", "surrogate-bytes"])
def test_journeydb_unholdable_annotation_line_is_one_malformed_line(tmp_path, bad):
    imgs = journeydb_source(tmp_path)
    anno = tmp_path / "anno.jsonl"
    anno.write_bytes(b"\n".join([record("aaa"), bad, record("ccc")]) + b"\n")
    cfg = IngestConfig(dataset="journeydb", source=str(imgs), annotations=str(anno), output_root=str(tmp_path / "o"))
    report = prepare(cfg)
    assert (report["num_records"], report["num_error"]) == (2, 1)
    assert report["errors"][0].startswith("malformed annotation line 2: ")
    rows = ingest_rows(cfg)
    assert ok_keys(rows) == ["aaa", "ccc"]
    assert errors(rows) == {"bbb": "image without an annotation record"}


# ---------------------------------------------------------------------------------------------------------------------
# 4. Bounded memory: tar members, pax headers, annotation lines
# ---------------------------------------------------------------------------------------------------------------------


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.GNU_FORMAT)


def _padding(size: int) -> bytes:
    return tarfile.NUL * (-size % tarfile.BLOCKSIZE)


def write_stream_tar(out, members: list[tuple[str, bytes | int]]) -> None:
    """A tar written member by member to `out`; an int member is that many zero bytes, written in 8 MiB pieces."""
    zeros = bytes(8 << 20)
    for name, data in members:
        size = data if isinstance(data, int) else len(data)
        out.write(_tar_header(name, size))
        if isinstance(data, int):
            for start in range(0, size, len(zeros)):
                out.write(zeros[: min(len(zeros), size - start)])
        else:
            out.write(data)
        out.write(_padding(size))
    out.write(tarfile.NUL * 2 * tarfile.BLOCKSIZE)


def test_huge_member_of_a_tgz_is_streamed_past(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    with open(imgs / "000.tgz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz:
        write_stream_tar(gz, [("000/aaa.jpg", GOOD), ("000/big.jpg", 3 * GB // 2), ("000/ccc.jpg", GOOD)])
    anno = tmp_path / "anno.jsonl"
    anno.write_bytes(record("aaa") + b"\n" + record("ccc") + b"\n")
    try:
        out = ingest_measured(dataset="journeydb", source=str(imgs), annotations=str(anno),
                              output_root=str(tmp_path / "o"))
    finally:
        (imgs / "000.tgz").unlink()
    assert out["rss"] < RSS_LIMIT, f"peak RSS {out['rss'] / 1e9:.2f} GB"
    assert {k: s for k, (s, _) in out["rows"].items()} == {"aaa": "ok", "big": "error", "ccc": "ok"}
    assert "exceeds the member size limit" in out["rows"]["big"][1]


def test_huge_member_of_a_plain_tar_is_never_read(tmp_path):
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "sa_000000.tar"
    big = 3 * GB // 2
    with open(path, "wb") as f:
        write_stream_tar(f, [(i.name, d) for i, d in sa1b_pair(1, GOOD, 90, 60)])
        f.seek(-2 * tarfile.BLOCKSIZE, os.SEEK_CUR)  # drop the end-of-archive blocks, append more members
        f.write(_tar_header("sa_2.jpg", big))
        f.seek(big + len(_padding(big)), os.SEEK_CUR)  # a sparse file: the zeros take no disk and no time
        write_stream_tar(f, [(i.name, d) for i, d in sa1b_pair(3, GOOD, 90, 60)])
    try:
        out = ingest_measured(dataset="sam", source=str(tmp_path / "src"), output_root=str(tmp_path / "o"))
    finally:
        path.unlink()
    assert out["rss"] < RSS_LIMIT, f"peak RSS {out['rss'] / 1e9:.2f} GB"
    assert {k: s for k, (s, _) in out["rows"].items()} == {"sa_1": "ok", "sa_2": "error", "sa_3": "ok"}
    assert "exceeds the member size limit" in out["rows"]["sa_2"][1]


def test_huge_file_in_an_imagenet_folder_is_never_read(tmp_path):
    folder = tmp_path / "train" / "n01440764"
    folder.mkdir(parents=True)
    (folder / "n01440764_1.JPEG").write_bytes(GOOD)
    with open(folder / "n01440764_2.JPEG", "wb") as f:
        f.truncate(3 * GB // 2)  # sparse
    (folder / "n01440764_3.JPEG").write_bytes(GOOD)
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n01440764 tench, Tinca tinca\n")
    try:
        out = ingest_measured(dataset="imagenet", source=str(tmp_path / "train"), synset_mapping=str(mapping),
                              output_root=str(tmp_path / "o"))
    finally:
        (folder / "n01440764_2.JPEG").unlink()
    assert out["rss"] < RSS_LIMIT, f"peak RSS {out['rss'] / 1e9:.2f} GB"
    assert {k: s for k, (s, _) in out["rows"].items()} == {
        "n01440764_1": "ok", "n01440764_2": "error", "n01440764_3": "ok"}
    assert "exceeds the member size limit" in out["rows"]["n01440764_2"][1]


def test_huge_pax_header_ends_the_archive_unread(tmp_path):
    """tarfile reads an extended header whole before any member check could run: it must be bounded too."""
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "sa_000000.tar"
    big = 3 * GB // 2
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, big
    with open(path, "wb") as f:
        write_stream_tar(f, [(i.name, d) for i, d in sa1b_pair(1, GOOD, 90, 60)])
        f.seek(-2 * tarfile.BLOCKSIZE, os.SEEK_CUR)
        f.write(pax.tobuf(tarfile.USTAR_FORMAT))
        f.seek(big + len(_padding(big)), os.SEEK_CUR)  # sparse
        write_stream_tar(f, [(i.name, d) for i, d in sa1b_pair(3, GOOD, 90, 60)])
    try:
        out = ingest_measured(dataset="sam", source=str(tmp_path / "src"), output_root=str(tmp_path / "o"))
    finally:
        path.unlink()
    assert out["rss"] < RSS_LIMIT, f"peak RSS {out['rss'] / 1e9:.2f} GB"
    assert {k: s for k, (s, _) in out["rows"].items()} == {"sa_1": "ok", "sa_000000": "error"}
    assert "extended header refused" in out["rows"]["sa_000000"][1]


def test_huge_annotation_line_is_one_malformed_line(tmp_path):
    imgs = journeydb_source(tmp_path)
    anno = tmp_path / "anno.jsonl.gz"
    chunk = b"a" * (8 << 20)
    with open(anno, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz:
        gz.write(record("aaa") + b"\n" + b'{"img_path": "./000/bbb.jpg", "prompt": "')
        for _ in range(1_200_000_000 // len(chunk)):  # one 1.2 GB line
            gz.write(chunk)
        gz.write(b'"}\n' + record("ccc") + b"\n")
    try:
        out = ingest_measured(dataset="journeydb", source=str(imgs), annotations=str(anno),
                              output_root=str(tmp_path / "o"))
    finally:
        anno.unlink()
    assert out["rss"] < RSS_LIMIT, f"peak RSS {out['rss'] / 1e9:.2f} GB"
    assert out["report"]["num_records"] == 2 and out["report"]["num_error"] == 1
    assert re.fullmatch(r"malformed annotation line 2: line of 1\d{9} bytes is over the limit of \d+",
                        out["report"]["errors"][0])
    assert out["rows"] == {"aaa": ["ok", None], "bbb": ["error", "image without an annotation record"],
                           "ccc": ["ok", None]}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".tgz"])
def test_annotation_line_limit_in_every_container(tmp_path, suffix):
    lines = [record("aaa"), b'{"prompt": "' + b"x" * 300 + b'"}', b"", record("ccc"), b'["' + b"y" * 200]
    text = b"\n".join(lines)  # the last line, over the limit too, has no newline
    path = tmp_path / f"anno{suffix}"
    if suffix == ".jsonl":
        path.write_bytes(text)
    elif suffix == ".jsonl.gz":
        path.write_bytes(gzip.compress(text))
    else:
        with tarfile.open(path, "w:gz") as tf:
            add_member(tf, "anno.jsonl", text)
    got = list(iter_annotations(str(path), max_line_bytes=100))
    assert [r.get("key") for r in got] == ["aaa", None, "ccc", None]
    assert [r["line"] for r in got] == [1, 2, 4, 5]
    assert got[1]["error"] == "malformed annotation line 2: line of 314 bytes is over the limit of 100"
    assert got[3]["error"] == "malformed annotation line 5: line of 202 bytes is over the limit of 100"


def test_rss_helper_sees_big_allocations():
    """The memory tests are only as good as the measurement: a 1.2 GB buffer must show."""
    out = run_measured("import json\nbuf = bytearray(1_200_000_000)\nout = {}")
    assert out["rss"] > RSS_LIMIT

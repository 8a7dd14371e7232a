"""Bad input: every defective sample gets an error row with a reason, every good sample is still ingested."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from storage.ingest.config import IngestConfig
from storage.ingest.samples import add_member
from storage.ingest.shard import ingest_shard, list_shards, prepare
from storage.manifest import read_dataset
from tests import images
from tests.archives import file_member, sa1b_pair, special_member, write_tar

GOOD = images.jpeg("chelsea", (90, 60))


def ingest_rows(cfg: IngestConfig) -> dict[str, dict]:
    prepare(cfg)
    results = [ingest_shard(s, cfg) for s in list_shards(cfg)]
    rows = read_dataset(cfg.output_root, cfg.dataset).to_pylist()
    assert sum(r.num_ok + r.num_error for r in results) == len(rows)
    return {r["key"]: r for r in rows}


def sam_rows(tmp_path, members) -> dict[str, dict]:
    (tmp_path / "src").mkdir(exist_ok=True)
    write_tar(tmp_path / "src" / "sa_000000.tar", members)
    return ingest_rows(IngestConfig(dataset="sam", source=str(tmp_path / "src"), output_root=str(tmp_path / "out")))


def assert_only_error(rows, key, reason):
    assert rows[key]["status"] == "error", rows[key]
    assert reason in rows[key]["error"], rows[key]["error"]


def test_bad_image_bytes(tmp_path):
    rows = sam_rows(tmp_path, [
        *sa1b_pair(1, GOOD, 90, 60),
        *sa1b_pair(2, images.corrupt_header(images.jpeg()), 451, 300),
        *sa1b_pair(3, images.truncated(images.jpeg()), 451, 300),
        *sa1b_pair(4, b"", 10, 10),
        *sa1b_pair(5, b"<html>403 Forbidden</html>", 10, 10),
        *sa1b_pair(6, images.png_header_only(12_000, 12_000), 12_000, 12_000),
        *sa1b_pair(7, GOOD, 300, 200),  # JSON disagrees with the image
        *sa1b_pair(8, GOOD, 90, 60),
    ])
    assert [k for k, r in rows.items() if r["status"] == "ok"] == ["sa_1", "sa_8"]
    assert "corrupt" in rows["sa_2"]["error"] or "not an image" in rows["sa_2"]["error"]
    assert_only_error(rows, "sa_3", "truncated")
    assert_only_error(rows, "sa_4", "empty")
    assert_only_error(rows, "sa_5", "not an image")
    assert_only_error(rows, "sa_6", "exceeds the limit")
    assert_only_error(rows, "sa_7", "JSON says 300x200, image is 90x60")
    assert rows["sa_3"]["hash"].startswith("xxh3_128:") and rows["sa_3"]["bytes"] > 0  # still described


def test_unpaired_and_malformed_json(tmp_path):
    rows = sam_rows(tmp_path, [
        *sa1b_pair(1, GOOD, 90, 60),
        sa1b_pair(2, GOOD, 90, 60)[0],  # image without its JSON
        sa1b_pair(3, GOOD, 90, 60)[1],  # JSON without its image
        file_member("sa_4.jpg", GOOD), file_member("sa_4.json", b'{"image": {"width": 90, '),
        file_member("sa_5.jpg", GOOD), file_member("sa_5.json", b'{"annotations": []}'),
        *sa1b_pair(6, GOOD, 90, 60),
    ])
    assert sorted(k for k, r in rows.items() if r["status"] == "ok") == ["sa_1", "sa_6"]
    assert_only_error(rows, "sa_2", "image without its JSON")
    assert_only_error(rows, "sa_3", "JSON without its image")
    assert_only_error(rows, "sa_4", "malformed JSON")
    assert_only_error(rows, "sa_5", "lacks image field")


def test_tar_truncated_mid_member_keeps_complete_samples(tmp_path):
    src = tmp_path / "full.tar"
    write_tar(src, [m for i in range(1, 5) for m in sa1b_pair(i, GOOD, 90, 60)])
    data = src.read_bytes()
    with tarfile.open(src) as tf:
        cut = tf.getmember("./sa_3.jpg").offset_data + 100  # inside the third image
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "sa_000007.tar").write_bytes(data[:cut])
    rows = ingest_rows(IngestConfig(dataset="sam", source=str(tmp_path / "src"), output_root=str(tmp_path / "out")))
    assert sorted(k for k, r in rows.items() if r["status"] == "ok") == ["sa_1", "sa_2"]
    assert_only_error(rows, "sa_000007", "truncated")
    assert len(rows) == 3


def test_tar_cut_between_members_is_still_detected(tmp_path):
    src = tmp_path / "full.tar"
    write_tar(src, [m for i in range(1, 4) for m in sa1b_pair(i, GOOD, 90, 60)])
    with tarfile.open(src) as tf:
        cut = tf.getmember("./sa_3.jpg").offset  # exactly at a header boundary
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "sa_000001.tar").write_bytes(src.read_bytes()[:cut])
    rows = ingest_rows(IngestConfig(dataset="sam", source=str(tmp_path / "src"), output_root=str(tmp_path / "out")))
    assert sorted(k for k, r in rows.items() if r["status"] == "ok") == ["sa_1", "sa_2"]
    assert_only_error(rows, "sa_000001", "no end-of-archive marker")


@pytest.mark.parametrize("content", [b"", b"this is not a tar at all" * 40])
def test_unreadable_archive_is_one_error_row(tmp_path, content):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "sa_000000.tar").write_bytes(content)
    rows = ingest_rows(IngestConfig(dataset="sam", source=str(tmp_path / "src"), output_root=str(tmp_path / "out")))
    assert list(rows) == ["sa_000000"]
    assert_only_error(rows, "sa_000000", "not a readable tar archive")


def test_hostile_members_are_refused_and_nothing_escapes_the_output_root(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("secret")
    rows = sam_rows(tmp_path, [
        *sa1b_pair(1, GOOD, 90, 60),
        file_member("/tmp/sa_2.jpg", GOOD),
        file_member("../../sa_3.jpg", GOOD),
        special_member("sa_4.jpg", tarfile.SYMTYPE, str(victim)),
        special_member("sa_5.jpg", tarfile.LNKTYPE, "sa_1.jpg"),
        special_member("sa_6.jpg", tarfile.CHRTYPE),
        special_member("sa_7.jpg", tarfile.FIFOTYPE),
        *sa1b_pair(8, GOOD, 90, 60),
    ])
    assert sorted(k for k, r in rows.items() if r["status"] == "ok") == ["sa_1", "sa_8"]
    assert_only_error(rows, "sa_2", "absolute member path")
    assert_only_error(rows, "sa_3", "unsafe member path")
    assert_only_error(rows, "sa_4", "symlink")
    assert_only_error(rows, "sa_5", "hard link")
    assert_only_error(rows, "sa_6", "device file")
    assert_only_error(rows, "sa_7", "FIFO")
    assert all(rows[k]["hash"] is None for k in ("sa_4", "sa_5", "sa_6"))  # never followed or read
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"victim.txt", "src/sa_000000.tar", "out/manifests/sam/sa_000000.parquet",
                       "out/manifests/sam/sa_000000.parquet.done"}
    assert not os.path.exists("/tmp/sa_2.jpg") or os.path.getmtime("/tmp/sa_2.jpg") < victim.stat().st_mtime


def test_journeydb_defects(tmp_path, samples):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    with tarfile.open(imgs / "000.tgz", "w:gz") as tf:
        add_member(tf, "000/aaa.jpg", GOOD)
        add_member(tf, "000/bbb.jpg", GOOD)  # no record for it
        add_member(tf, "000/ccc.jpg", images.truncated(GOOD))
        add_member(tf, "000/ddd.png", GOOD)  # record says .jpg: matched by folder + stem
    records = [{"img_path": "./000/aaa.jpg", "prompt": "a cat --ar 3:2", "Task2": {"Caption": "A cat."}},
               {"img_path": "./000/ccc.jpg", "prompt": "x", "Task2": None},
               {"img_path": "./000/ddd.jpg", "prompt": "y"},
               {"img_path": "./000/zzz.jpg", "prompt": "image never shipped"}]
    lines = [json.dumps(r) for r in records] + ['{"img_path": "./000/broken.jpg", "prompt": ', "[1, 2]", "{}"]
    anno = tmp_path / "anno.jsonl"
    anno.write_text("\n".join(lines) + "\n")
    cfg = IngestConfig(dataset="journeydb", source=str(imgs), annotations=str(anno), output_root=str(tmp_path / "o"))
    report = prepare(cfg)
    assert report["num_records"] == 4 and report["num_error"] == 3
    assert all("malformed annotation line" in e for e in report["errors"])
    rows = ingest_rows(cfg)
    assert sorted(k for k, r in rows.items() if r["status"] == "ok") == ["aaa", "ddd"]
    assert rows["aaa"]["prompt"] == "a cat" and rows["aaa"]["caption"] == "A cat."
    assert_only_error(rows, "bbb", "image without an annotation record")
    assert_only_error(rows, "ccc", "truncated")
    assert_only_error(rows, "zzz", "annotation record without its image")


def test_journeydb_truncated_tgz(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    with tarfile.open(tmp_path / "full.tgz", "w:gz") as tf:
        for name, photo in (("a", "coffee"), ("b", "chelsea"), ("c", "rocket")):
            add_member(tf, f"000/{name}.jpg", images.jpeg(name=photo, size=(200, 150)))
    data = (tmp_path / "full.tgz").read_bytes()
    (imgs / "000.tgz").write_bytes(data[: len(data) - 2000])  # inside the last image
    anno = tmp_path / "a.jsonl"
    anno.write_text("".join(json.dumps({"img_path": f"./000/{n}.jpg", "prompt": n}) + "\n" for n in "abc"))
    rows = ingest_rows(IngestConfig(dataset="journeydb", source=str(imgs), annotations=str(anno),
                                    output_root=str(tmp_path / "o")))
    ok = [k for k, r in rows.items() if r["status"] == "ok"]
    assert sorted(ok) == ["a", "b"]
    assert_only_error(rows, "000", "truncated")
    assert "c" in rows and "not reached" in rows["c"]["error"]


def test_imagenet_wds_defects(tmp_path):
    (tmp_path / "wds").mkdir()
    write_tar(tmp_path / "wds" / "imagenet1k-train-0000.tar", [
        file_member("n01440764_1.cls", b"0"), file_member("n01440764_1.jpg", GOOD),
        file_member("n01440764_2.jpg", GOOD),  # no label
        file_member("n01440764_3.cls", b"0"),  # no image
        file_member("n01440764_4.cls", b"zero"), file_member("n01440764_4.jpg", GOOD),
        file_member("n01440764_5.cls", b"0"), file_member("n01440764_5.jpg", b"\x00" * 100),
        file_member("n01440764_6.cls", b"0"), file_member("n01440764_6.jpg", GOOD),
    ])
    rows = ingest_rows(IngestConfig(dataset="imagenet", source=str(tmp_path / "wds"), output_root=str(tmp_path / "o")))
    assert sorted(k for k, r in rows.items() if r["status"] == "ok") == ["n01440764_1", "n01440764_6"]
    assert_only_error(rows, "n01440764_2", "image without a .cls label")
    assert_only_error(rows, "n01440764_3", "label without an image")
    assert_only_error(rows, "n01440764_4", "malformed .cls")
    assert_only_error(rows, "n01440764_5", "not an image")


def _pixart(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_missing_source_is_one_clear_message(tmp_path):
    proc = _pixart("ingest", "sam", f"source={tmp_path}/nope", f"output_root={tmp_path}/out")
    assert proc.returncode != 0
    assert f"error: {tmp_path}/nope: does not exist" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "manifests" / "sam" / "sa_000000.parquet").exists()


def test_bad_config_is_reported_before_anything_runs(tmp_path):
    proc = _pixart("ingest", "sam", "nonsense_key=1")
    assert proc.returncode == 2 and "nonsense_key: unknown key; this section takes: " in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sa1b_json_checks_by_verify_level(tmp_path):
    image_last = json.dumps({"annotations": [{"id": 1, "segmentation": {"size": [60, 90], "counts": "0a1b"}}],
                             "image": {"image_id": 2, "width": 90, "height": 60, "file_name": "sa_2.jpg"}}).encode()
    bad_masks = b'{"image": {"image_id": 3, "width": 90, "height": 60}, "annotations": [{"id": 1,, }]}'
    members = [*sa1b_pair(1, GOOD, 90, 60),
               file_member("sa_2.jpg", GOOD), file_member("sa_2.json", image_last),  # key order varies
               file_member("sa_3.jpg", GOOD), file_member("sa_3.json", bad_masks),
               file_member("sa_4.jpg", GOOD), file_member("sa_4.json", image_last[:-30])]  # cut short
    (tmp_path / "src").mkdir()
    write_tar(tmp_path / "src" / "sa_000000.tar", members)
    header = ingest_rows(IngestConfig(dataset="sam", source=str(tmp_path / "src"), output_root=str(tmp_path / "h")))
    full = ingest_rows(IngestConfig(dataset="sam", source=str(tmp_path / "src"), output_root=str(tmp_path / "f"),
                                    decode={"verify": "full"}))
    assert sorted(k for k, r in header.items() if r["status"] == "ok") == ["sa_1", "sa_2", "sa_3"]
    assert_only_error(header, "sa_4", "cut short")
    assert sorted(k for k, r in full.items() if r["status"] == "ok") == ["sa_1", "sa_2"]
    assert_only_error(full, "sa_3", "malformed JSON")
    assert_only_error(full, "sa_4", "malformed JSON")


def test_decoded_size_limit_comes_from_the_config(tmp_path):
    (tmp_path / "src").mkdir()
    write_tar(tmp_path / "src" / "sa_000000.tar", [*sa1b_pair(1, GOOD, 90, 60)])
    cfg = IngestConfig(dataset="sam", source=str(tmp_path / "src"), output_root=str(tmp_path / "out"),
                       decode={"max_decoded_bytes": 90 * 60 * 3 - 1})
    rows = ingest_rows(cfg)
    assert_only_error(rows, "sa_1", "over the limit of 16199")


def test_corrupt_committed_manifest_is_one_error_line_naming_it(samples, tiny_llava, tiny_t5, tmp_path):
    out = tmp_path / "out"
    ingest = _pixart("ingest", "sam", f"source={samples['sam']}", f"output_root={out}")
    assert ingest.returncode == 0, ingest.stderr
    manifest = out / "manifests" / "sam" / "sa_000000.parquet"
    blob = bytearray(manifest.read_bytes())
    blob[8:200] = b"\x00" * 192  # the first column chunk's pages: the footer still parses, the data does not
    manifest.write_bytes(bytes(blob))
    proc = _pixart("caption", "sam", f"output_root={out}", f"model={tiny_llava}", f"t5_tokenizer={tiny_t5}",
                   "caption_set=x", "generation.max_new_tokens=4", "batch_size=4")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "ArrowInvalid" not in proc.stderr, proc.stderr[-3000:]
    assert f"{manifest}: not a readable parquet table" in proc.stderr, proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) < 30

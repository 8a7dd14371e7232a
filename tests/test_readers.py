"""Each source reader on well-formed shards in the real layouts."""

import gzip
import shutil
import tarfile

import pytest

from storage.errors import SourceError
from storage.ingest.config import IngestConfig
from storage.ingest.shard import ingest_shard, list_shards, prepare
from storage.ingest.sources.journeydb import strip_midjourney_flags
from storage.manifest import read_dataset


def ingest_all(cfg: IngestConfig) -> list[dict]:
    prepare(cfg)
    for shard in list_shards(cfg):
        ingest_shard(shard, cfg)
    return read_dataset(cfg.output_root, cfg.dataset).to_pylist()


# ---------------------------------------------------------------------------------------------------------------------
# SA-1B
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dir", "glob", "links", "single"])
def test_sa1b_source_forms(samples, tmp_path, form):
    source = {"dir": samples["sam"], "glob": samples["sam"] + "/sa_*.tar", "links": samples["sam_links"],
              "single": samples["sam"] + "/sa_000001.tar"}[form]
    rows = ingest_all(IngestConfig(dataset="sam", source=source, output_root=str(tmp_path)))
    assert len(rows) == (4 if form == "single" else 8)
    assert all(r["status"] == "ok" and r["error"] is None for r in rows)
    first = rows[0]
    assert first["key"].startswith("sa_") and first["member"] == first["key"] + ".jpg"  # './' prefix stripped
    assert min(first["width"], first["height"]) == 160 and first["format"] == "JPEG"
    assert len(first["hash"]) == len("xxh3_128:") + 32 and first["sha256"] is None
    assert first["bytes"] > 1000 and first["offset"] > 0


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_a_source_changed_since_ingest_is_caught_by_either_hash(samples, tmp_path, algorithm):
    from storage.readers import iter_manifest_images

    src = tmp_path / "src"
    shutil.copytree(samples["sam"], src)
    rows = ingest_all(IngestConfig(dataset="sam", source=str(src), output_root=str(tmp_path / "out"), hash=algorithm))
    assert (rows[0]["sha256"] is not None) == (algorithm == "sha256")
    with open(rows[0]["source_url"], "r+b") as f:  # one byte of the first image changes after ingest
        f.seek(rows[0]["offset"] + 100)
        byte = f.read(1)
        f.seek(rows[0]["offset"] + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    got = {row["key"]: (data, err) for row, data, err in iter_manifest_images(rows)}
    assert got[rows[0]["key"]] == (None, "source bytes changed since ingest (hash mismatch)")
    assert all(data is not None for key, (data, _) in got.items() if key != rows[0]["key"])


def test_sa1b_offsets_point_at_the_image_bytes(samples, tmp_path):
    rows = ingest_all(IngestConfig(dataset="sam", source=samples["sam"], output_root=str(tmp_path)))
    raw = open(rows[0]["source_url"], "rb").read()
    assert raw[rows[0]["offset"]:rows[0]["offset"] + 2] == b"\xff\xd8"


def test_links_file_must_have_the_header(tmp_path):
    bad = tmp_path / "links.tsv"
    bad.write_text("sa_000000.tar\thttps://example.invalid/x\n")
    with pytest.raises(SourceError, match="file_name<TAB>cdn_link"):
        list_shards(IngestConfig(dataset="sam", source=str(bad)))


# ---------------------------------------------------------------------------------------------------------------------
# JourneyDB
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("a cat, oil painting --ar 16:9 --v 5", "a cat, oil painting"),
        ("portrait --ar 2:3 --q 2 --s 750", "portrait"),
        ("alley at night \u2014ar 16:9 \u2014v 5.1", "alley at night"),
        ("https://s.mj.run/abc a crowned cat --niji 5", "a crowned cat"),
        ("no flags here", "no flags here"),
        ("well-lit room, semi-realistic", "well-lit room, semi-realistic"),
    ],
)
def test_midjourney_flags_are_stripped(raw, clean):
    assert strip_midjourney_flags(raw) == clean


@pytest.mark.parametrize("anno_form", ["tgz", "jsonl", "gz"])
def test_journeydb_joins_images_to_annotations(samples, tmp_path, anno_form):
    anno = samples["journeydb_annotations"]
    if anno_form != "tgz":
        with tarfile.open(anno) as tf:
            text = tf.extractfile(tf.getmembers()[0]).read()
        anno = str(tmp_path / f"anno.jsonl{'.gz' if anno_form == 'gz' else ''}")
        with open(anno, "wb") as f:
            f.write(gzip.compress(text) if anno_form == "gz" else text)
    cfg = IngestConfig(dataset="journeydb", source=samples["journeydb"], annotations=anno,
                       output_root=str(tmp_path / "out"))
    rows = ingest_all(cfg)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert {r["shard"] for r in rows} == {"000", "001"}
    assert all("--" not in r["prompt"] and "\u2014" not in r["prompt"] for r in rows)
    assert any("--ar" in r["prompt_raw"] for r in rows)
    assert sum(r["caption"] is None for r in rows) == 2  # Task2.Caption null for every third record
    assert all(r["member"].startswith(r["shard"] + "/") for r in rows)


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet
# ---------------------------------------------------------------------------------------------------------------------


def test_imagenet_folders_use_the_synset_mapping(samples, tmp_path):
    cfg = IngestConfig(dataset="imagenet", source=samples["imagenet"], synset_mapping=samples["synset_mapping"],
                       output_root=str(tmp_path))
    rows = ingest_all(cfg)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert {(r["wnid"], r["label"]) for r in rows} == {("n01440764", 0), ("n01443537", 1), ("n01484850", 2)}
    assert all(r["key"].startswith(r["wnid"] + "_") for r in rows)


def test_imagenet_folders_without_mapping_is_a_clear_error(samples, tmp_path):
    cfg = IngestConfig(dataset="imagenet", source=samples["imagenet"], output_root=str(tmp_path))
    with pytest.raises(SourceError, match="synset_mapping"):
        list_shards(cfg)
    with pytest.raises(SourceError, match="does not exist"):
        list_shards(cfg.model_copy(update={"synset_mapping": str(tmp_path / "missing.txt")}))


def test_imagenet_class_folder_missing_from_mapping_gets_error_rows(samples, tmp_path):
    src = tmp_path / "train"
    shutil.copytree(samples["imagenet"], src)
    (src / "n09999999").mkdir()
    shutil.copy(next((src / "n01440764").iterdir()), src / "n09999999" / "n09999999_1.JPEG")
    cfg = IngestConfig(dataset="imagenet", source=str(src), synset_mapping=samples["synset_mapping"],
                       output_root=str(tmp_path / "out"))
    rows = {r["key"]: r for r in ingest_all(cfg)}
    assert "not in the synset mapping" in rows["n09999999_1"]["error"]
    assert sum(r["status"] == "ok" for r in rows.values()) == 8


def test_imagenet_webdataset_shards(samples, tmp_path):
    cfg = IngestConfig(dataset="imagenet", source=samples["imagenet_wds"], synset_mapping=samples["synset_mapping"],
                       output_root=str(tmp_path))
    rows = ingest_all(cfg)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert rows[0]["key"] == "n01440764_1000" and rows[0]["label"] == 0 and rows[0]["wnid"] == "n01440764"
    assert rows[0]["member"] == "n01440764_1000.jpg"

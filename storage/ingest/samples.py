"""Build small sample datasets in the real SA-1B, JourneyDB and ImageNet formats from real photographs.

The photos ship inside scikit-image (`pip install scikit-image`), so this works offline. Used by the demo, the
tests and the benchmarks:

    paths = build_samples("/tmp/raw", short_side=1500)   # SA-1B-like resolution
    paths["sam"], paths["journeydb"], paths["journeydb_annotations"], paths["imagenet"], ...
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "motorcycle")
# (h/w) crops that spread the samples over the aspect-ratio buckets, extremes included
CROPS = (None, 0.5, 0.75, 1.0, 1.33, 2.0, None, 0.6, 1.5)
WNIDS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"}
PROMPTS = (
    "a cozy reading nook by a rainy window, warm lamp light, watercolor --ar 3:2 --v 5",
    "portrait of an astronaut in a sunflower field, studio ghibli style --ar 2:3 --q 2 --s 750",
    "macro photograph of coffee crema, swirling patterns, 8k",
    "a red vintage motorcycle parked in an alley, cinematic lighting \u2014ar 16:9 \u2014v 5.1",
    "https://s.mj.run/abc123 a cat wearing a tiny crown, oil painting --niji 5 --style expressive",
)


def load_photo(name: str) -> Image.Image:
    """An RGB PIL image of one of the photographs bundled with scikit-image."""
    from skimage import data  # imported lazily: only the samples need scikit-image

    arr = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return Image.fromarray(arr).convert("RGB")


def _crop(im: Image.Image, ratio: float | None) -> Image.Image:
    if ratio is None:
        return im
    w, h = im.size
    if h / w > ratio:
        nh = int(w * ratio)
        return im.crop((0, (h - nh) // 2, w, (h - nh) // 2 + nh))
    nw = int(h / ratio)
    return im.crop(((w - nw) // 2, 0, (w - nw) // 2 + nw, h))


def photo_variants(count: int, short_side: int) -> list[Image.Image]:
    """`count` photos cropped to varied aspect ratios and resized so the short side is `short_side`."""
    out = []
    for i in range(count):
        im = _crop(load_photo(PHOTOS[i % len(PHOTOS)]), CROPS[i % len(CROPS)])
        scale = short_side / min(im.size)
        out.append(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC))
    return out


def jpeg_bytes(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tf.addfile(info, io.BytesIO(data))


def sa1b_json(image_id: int, width: int, height: int, rng: random.Random, num_masks: int = 60) -> bytes:
    """A per-image JSON with the SA-1B schema (RLE strings are random, not real masks)."""
    alphabet = "0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz"
    anns = []
    for k in range(num_masks):
        x, y = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
        bw, bh = rng.uniform(10, width / 2), rng.uniform(10, height / 2)
        anns.append({
            "id": image_id * 1000 + k,
            "segmentation": {"size": [height, width],
                             "counts": "".join(rng.choice(alphabet) for _ in range(rng.randint(100, 600)))},
            "bbox": [x, y, bw, bh], "area": int(bw * bh * 0.6),
            "predicted_iou": rng.uniform(0.85, 1.0), "stability_score": rng.uniform(0.9, 1.0),
            "crop_box": [0.0, 0.0, float(width), float(height)], "point_coords": [[x + bw / 2, y + bh / 2]],
        })
    doc = {"image": {"image_id": image_id, "width": width, "height": height, "file_name": f"sa_{image_id}.jpg"},
           "annotations": anns}
    return json.dumps(doc).encode()


def write_sa1b_tar(path: Path, images: list[Image.Image], first_id: int, seed: int = 0) -> list[str]:
    """`sa_NNNNNN.tar` with `./sa_<id>.jpg` + `./sa_<id>.json` per image; returns the keys."""
    rng = random.Random(seed)
    keys = []
    with tarfile.open(path, "w") as tf:
        for i, im in enumerate(images):
            image_id = first_id + i
            add_member(tf, f"./sa_{image_id}.jpg", jpeg_bytes(im))
            add_member(tf, f"./sa_{image_id}.json", sa1b_json(image_id, im.width, im.height, rng))
            keys.append(f"sa_{image_id}")
    return keys


def build_samples(out_dir: str | Path, *, short_side: int = 256, per_shard: int = 4, num_shards: int = 2) -> dict:
    """Write SA-1B, JourneyDB and ImageNet (folder + webdataset) samples under `out_dir`; return their paths."""
    out = Path(out_dir)
    n = per_shard * num_shards
    photos = photo_variants(n, short_side)

    sam = out / "sa1b"
    sam.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        write_sa1b_tar(sam / f"sa_{s:06d}.tar", photos[s * per_shard:(s + 1) * per_shard], 226381 + 1000 * s, s)
    links = sam / "sa1b_links.tsv"
    links.write_text("file_name\tcdn_link\n" + "".join(
        f"sa_{s:06d}.tar\t{(sam / f'sa_{s:06d}.tar').as_posix()}\n" for s in range(num_shards)))

    jdb = out / "journeydb" / "data" / "train"
    (jdb / "imgs").mkdir(parents=True, exist_ok=True)
    records = []
    for s in range(num_shards):
        folder = f"{s:03d}"
        with tarfile.open(jdb / "imgs" / f"{folder}.tgz", "w:gz") as tf:
            for i in range(per_shard):
                k = s * per_shard + i
                img_id = f"{k:04x}e1c5d2a8b7f6{k:04d}"
                add_member(tf, f"{folder}/{img_id}.jpg", jpeg_bytes(photos[k].resize(
                    (photos[k].width // 2, photos[k].height // 2))))
                records.append({"img_path": f"./{folder}/{img_id}.jpg", "prompt": PROMPTS[k % len(PROMPTS)],
                                "Task1": {"Style": ["watercolor"], "Content": ["window"], "Atmosphere": ["cozy"],
                                          "Others": []},
                                "Task2": {"Caption": None if k % 3 == 2 else f"A photo of {PHOTOS[k % len(PHOTOS)]}."},
                                "Task3": {"Style Relevant Questions and Answers": [],
                                          "Content Relevant Questions and Answers": []}})
    jsonl = "".join(json.dumps(r) + "\n" for r in records).encode()
    anno = jdb / "train_anno_realease_repath.jsonl.tgz"
    with tarfile.open(anno, "w:gz") as tf:
        add_member(tf, "train_anno_realease_repath.jsonl", jsonl)

    inet = out / "imagenet"
    mapping = inet / "LOC_synset_mapping.txt"
    (inet / "train").mkdir(parents=True, exist_ok=True)
    mapping.write_text("".join(f"{w} {lemma}\n" for w, lemma in WNIDS.items()))
    wnids = list(WNIDS)
    wds_dir = inet / "wds"
    wds_dir.mkdir(exist_ok=True)
    with tarfile.open(wds_dir / "imagenet1k-train-0000.tar", "w") as tf:
        for k, im in enumerate(photos):
            wnid = wnids[k % len(wnids)]
            small = im.resize((im.width * 2 // 3, im.height * 2 // 3))
            folder = inet / "train" / wnid
            folder.mkdir(exist_ok=True)
            (folder / f"{wnid}_{1000 + k}.JPEG").write_bytes(jpeg_bytes(small))
            key = f"{wnid}_{1000 + k}"
            add_member(tf, f"{key}.cls", str(k % len(wnids)).encode())
            add_member(tf, f"{key}.jpg", jpeg_bytes(small))
            add_member(tf, f"{key}.json", json.dumps({"filename": f"{key}.JPEG", "label": k % len(wnids),
                                                      "width": small.width, "height": small.height}).encode())
    return {"sam": str(sam), "sam_links": str(links), "journeydb": str(jdb / "imgs"),
            "journeydb_annotations": str(anno), "imagenet": str(inet / "train"), "imagenet_wds": str(wds_dir),
            "synset_mapping": str(mapping)}

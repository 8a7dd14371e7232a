"""Build tar archives member by member, including hostile members no honest writer would produce."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from storage.ingest.samples import sa1b_json


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special_member(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def write_tar(path: Path, members: list, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def sa1b_pair(image_id: int, jpeg: bytes, width: int, height: int, prefix: str = "./") -> list:
    return [file_member(f"{prefix}sa_{image_id}.jpg", jpeg),
            file_member(f"{prefix}sa_{image_id}.json", sa1b_json(image_id, width, height, __import__("random").Random(
                image_id), num_masks=3))]

"""Stream members out of a (possibly compressed, possibly remote) tar archive without extracting anything.

Each regular file comes out as a `TarEntry` with its bytes. Members that must never be followed or written
(symlinks, hard links, devices, FIFOs, absolute or `..` names) come out as entries with an `error` and no data.
An archive cut short (mid-member, mid-header, or missing its end-of-archive blocks) ends with one entry whose
`truncated` flag is set: every complete member before the cut has already been yielded.

Memory stays bounded whatever the archive holds. A member over `max_member_bytes` (default 256 MiB, see
`DEFAULT_MAX_MEMBER_BYTES`) becomes an error entry and is skipped (seeked past, or read past in 16 MiB pieces when
streaming), never held. A pax or GNU long-name header over 1 MiB, which tarfile would read whole, ends the archive
as corrupt. A member name whose bytes are not UTF-8 (tarfile hands it over surrogate-escaped, which parquet cannot
store) becomes an error entry whose name has those bytes backslash-escaped.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from storage.urls import filesystem, open_url, protocol_of

STREAM_BUFFER = 1 << 16  # tarfile's stream reader copies its leftover buffer on every read: keep it small
# Filesystems whose files seek backwards cheaply: plain tars on them are read in random-access mode ("r:"), about
# twice as fast as streaming. HTTP files (SA-1B CDN links) claim to seek but cannot go back, so they stream.
SEEKABLE_PROTOCOLS = {"file", "local", "s3", "s3a", "gs", "gcs", "memory"}
_ZERO_BLOCK = tarfile.NUL * tarfile.BLOCKSIZE
# Above anything the sources hold legitimately (SA-1B JPEGs and JSONs of a few MB, JourneyDB and ImageNet images
# well under 50 MB) and above what the decode limits accept (384 MB decoded rarely compresses past half). A member
# read whole costs about twice its size at peak (tarfile's stream buffer plus the bytes), so ~512 MB per worker.
DEFAULT_MAX_MEMBER_BYTES = 256 << 20
MAX_HEADER_BYTES = 1 << 20  # pax / GNU long-name headers: real ones are a few hundred bytes
_DRAIN_CHUNK = 16 << 20
_LONG_HEADERS = {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                 tarfile.GNUTYPE_LONGLINK}


@dataclass
class TarEntry:
    """One archive member. `name` has any leading './' removed."""

    name: str
    data: bytes | None = None
    offset: int | None = None  # byte offset of the data in the (uncompressed) archive
    error: str | None = None
    truncated: bool = False


class _HeaderTrackingInfo(tarfile.TarInfo):
    """Remembers the last header block read, so a missing end-of-archive marker can be told from a clean end.

    tarfile treats a short or missing header after the first member as the end of the archive, which would make a
    tar cut exactly between two members look complete.
    """

    @classmethod
    def fromtarfile(cls, tf):  # type: ignore[override]
        block = tf.fileobj.read(tarfile.BLOCKSIZE)
        tf.last_header_block = block
        info = cls.frombuf(block, tf.encoding, tf.errors)
        info.offset = tf.fileobj.tell() - tarfile.BLOCKSIZE
        if info.type in _LONG_HEADERS and info.size > MAX_HEADER_BYTES:  # tarfile would read it whole
            raise tarfile.ReadError(f"{info.size}-byte extended header refused (limit {MAX_HEADER_BYTES})")
        return info._proc_member(tf)


def normalize_member_name(name: str) -> tuple[str, str | None]:
    """(name without leading './', reason it is unsafe or None)."""
    clean = name
    while clean.startswith("./"):
        clean = clean[2:]
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        return clean, f"absolute member path {name!r} refused"
    if ".." in clean.split("/") or "\\" in clean or "\x00" in clean:
        return clean, f"unsafe member path {name!r} refused"
    return clean, None


def utf8_name(name: str) -> tuple[str, str | None]:
    """(name fit for a manifest, reason when its bytes are not UTF-8, else None).

    tarfile and os hand such a name over surrogate-escaped; parquet cannot store that, so it comes back with the
    offending bytes backslash-escaped (valid UTF-8, and still telling the bytes apart).
    """
    try:
        name.encode("utf-8")
        return name, None
    except UnicodeEncodeError:
        try:
            raw = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that is no escaped byte (pax headers decode with surrogatepass)
            raw = name.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "backslashreplace"), f"member name is not valid UTF-8: {raw!r}"


def too_large(size: int, limit: int) -> str:
    return f"member of {size} bytes exceeds the member size limit of {limit} bytes (skipped, never held)"


def _drain(member) -> None:
    """Read a member to its end in big pieces: tarfile's own skip reads a compressed stream 64 KiB at a time, each
    read copying the whole decompressed leftover, about 10x slower on a highly compressed member."""
    while member.read(_DRAIN_CHUNK):
        pass


def _kind(info: tarfile.TarInfo) -> str | None:
    if info.issym():
        return f"symlink to {info.linkname!r}"
    if info.islnk():
        return f"hard link to {info.linkname!r}"
    if info.ischr() or info.isblk():
        return "device file"
    if info.isfifo():
        return "FIFO"
    return None


def iter_tar(
    url: str, *, compressed: bool | None = None, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[TarEntry]:
    """Yield every member of the tar at `url` in archive order (see module doc for the error entries).

    `compressed=None` lets tarfile detect gzip/bz2/xz; `compressed=False` promises a plain tar, which is then read
    in random-access mode where the filesystem allows. Raises SourceError only when the URL cannot be opened.
    """
    fs, _ = filesystem(url)
    if compressed is False and protocol_of(fs) in SEEKABLE_PROTOCOLS:
        mode, kwargs = "r:", {}
    else:
        mode, kwargs = ("r|*" if compressed is None else "r|gz" if compressed else "r|"), {"bufsize": STREAM_BUFFER}
    raw = open_url(url, "rb")
    count = 0
    try:
        try:
            tf = tarfile.open(fileobj=raw, mode=mode, tarinfo=_HeaderTrackingInfo, **kwargs)
        except (tarfile.TarError, EOFError, OSError) as e:
            yield TarEntry(name="", error=f"not a readable tar archive: {e}", truncated=True)
            return
        is_plain = mode == "r:" or getattr(tf.fileobj, "comptype", "tar") == "tar"
        try:
            for info in tf:
                name, unsafe = normalize_member_name(info.name)
                if info.isdir():
                    continue
                name, not_utf8 = utf8_name(name)
                special = _kind(info)
                if not_utf8 or unsafe or special or not info.isreg():
                    reason = not_utf8 or unsafe or f"{special or 'non-regular member'} refused: {info.name!r}"
                    yield TarEntry(name=name, error=reason)
                    continue
                if info.size > max_member_bytes:
                    yield TarEntry(name=name, error=too_large(info.size, max_member_bytes))
                    if mode != "r:":  # random access seeks past it
                        _drain(tf.extractfile(info))
                    continue
                member = tf.extractfile(info)
                data = member.read() if member is not None else b""
                count += 1
                yield TarEntry(name=name, data=data, offset=info.offset_data if is_plain else None)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            yield TarEntry(name="", error=f"archive truncated or corrupt after {count} members: {e}", truncated=True)
            return
        last = getattr(tf, "last_header_block", None)
        if last != _ZERO_BLOCK:
            yield TarEntry(
                name="", error=f"archive truncated after {count} members: no end-of-archive marker", truncated=True
            )
    finally:
        raw.close()


def member_stem(name: str) -> tuple[str, str]:
    """('000/abc', '.jpg') style split of a member name into path-without-extension and lowercase extension."""
    root, ext = posixpath.splitext(name)
    return root, ext.lower()

"""Every location is a URL handled by fsspec: a local path, `file://...`, `s3://bucket/...` (or any fsspec scheme).

Credentials are never part of a URL or a config: s3 uses the standard AWS chain (environment, profile, instance
role), and `AWS_ENDPOINT_URL` points it at an S3-compatible server. Errors are turned into `SourceError`s whose
message names the URL and the cause, never the credentials.
"""

from __future__ import annotations

import os
import posixpath
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from storage.errors import SourceError, TransientSourceError, is_transient


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL or local path."""
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise SourceError(f"{url}: unsupported location ({e})") from None


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of `filesystem`: a URL string for a path on `fs` (plain path for local files)."""
    proto = protocol_of(fs)
    return path if proto in ("file", "local") else f"{proto}://{path}"


def join(url: str, *parts: str) -> str:
    """Join URL path parts with '/', keeping the scheme."""
    return posixpath.join(url.rstrip("/"), *parts) if parts else url


def basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


def describe_error(url: str, err: BaseException) -> str:
    """One line for a failed access, with the credential-related causes named plainly."""
    name = err.__class__.__name__
    text = str(err).splitlines()[0] if str(err) else name
    if isinstance(err, FileNotFoundError):
        if url.startswith(("http://", "https://")):  # fsspec reports refused connections the same way
            return f"{url}: not found or unreachable (an expired signed link?)"
        return f"{url}: does not exist"
    if isinstance(err, PermissionError) or name in ("NoCredentialsError", "PartialCredentialsError", "ClientError"):
        return f"{url}: access denied or credentials unusable ({name}: {text})"
    return f"{url}: cannot be read ({name}: {text})"


def open_url(url: str, mode: str = "rb", **kwargs: Any) -> IO[bytes]:
    """Open a URL for reading or writing; read errors become SourceError."""
    fs, path = filesystem(url)
    try:
        return fs.open(path, mode, **kwargs)
    except Exception as e:  # noqa: BLE001 - every backend raises its own types; we report them uniformly
        if "r" in mode:
            raise (TransientSourceError if is_transient(e) else SourceError)(describe_error(url, e)) from None
        raise


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    with open_url(url) as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def absolute_url(url: str) -> str:
    """A URL that means the same from any working directory: relative local paths become absolute."""
    if "://" in url or url.startswith("/"):
        return url
    return os.path.abspath(url)


def check_output_root(url: str, create_bucket: bool = False) -> None:
    """Refuse an object-store output root whose bucket does not exist, unless asked to create it: a typo in
    `s3://bucket/...` must not silently create a new bucket."""
    fs, path = filesystem(url)
    if protocol_of(fs) in ("file", "local"):
        return
    bucket = path.split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except Exception as e:  # noqa: BLE001 - backend errors become one clear line
        raise SourceError(describe_error(url, e)) from None
    if found:
        return
    if not create_bucket:
        raise SourceError(f"{url}: bucket {bucket!r} does not exist (pass create_bucket=true to create it)")
    fs.mkdir(bucket)

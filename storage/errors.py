"""Exceptions that carry a message fit to show a user as-is (no traceback needed), and which of them to retry.

Permanent errors (a missing source, access denied, an invalid config, bad data) fail a shard at once with their
reason: retrying cannot help. Transient ones (timeouts, throttling, a dropped connection, a killed worker) are
retried by the orchestrator. `is_transient` is the one place that decides.
"""

from __future__ import annotations

import errno


class PipelineError(Exception):
    """Base class: the message alone explains the problem. Permanent unless `transient` is set."""

    transient = False


class ConfigError(PipelineError):
    """A config file, preset or override is invalid."""


class SourceError(PipelineError):
    """A source (directory, archive, links file, bucket) cannot be found or read."""


class TransientSourceError(SourceError):
    """A source could not be read for a reason that may pass: network, timeout, throttling."""

    transient = True


class ImageDecodeError(PipelineError):
    """Bytes that are not a usable image: empty, truncated, corrupt, too large, or not an image at all."""


class ShardBusyError(PipelineError):
    """Another run holds this shard's lease: it is being processed elsewhere right now."""

    transient = True


_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR,
                     errno.EROFS, errno.EINVAL}
# Class names of third-party errors (botocore, aiohttp, Ray) that mean "try again later".
_TRANSIENT_NAMES = ("Timeout", "Throttl", "SlowDown", "Connection", "Disconnected", "BrokenProcessPool",
                    "WorkerCrashed", "ActorDied", "NodeDied", "ServiceUnavailable", "TooManyRequests")


def is_transient(err: BaseException) -> bool:
    """True when retrying the same shard may succeed; False for anything that will fail the same way again."""
    if isinstance(err, PipelineError):
        return err.transient
    if isinstance(err, (TimeoutError, ConnectionError)):
        return True
    if any(part in cls.__name__ for cls in type(err).__mro__ for part in _TRANSIENT_NAMES):
        return True
    if isinstance(err, OSError):  # ENOSPC and EIO may clear (space freed, device back); "not found" will not
        return err.errno not in _PERMANENT_ERRNOS and not isinstance(err, (FileNotFoundError, PermissionError))
    return False  # programming errors and bad data: the same input fails the same way


def one_line(err: BaseException) -> str:
    """`Class: first line of the message`, or the message alone for a PipelineError."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, PipelineError):
        return text or err.__class__.__name__
    return f"{err.__class__.__name__}: {text}" if text else err.__class__.__name__

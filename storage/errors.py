"""Exceptions that carry a message fit to show a user as-is (no traceback needed)."""


class PipelineError(Exception):
    """Base class: the message alone explains the problem."""


class ConfigError(PipelineError):
    """A config file, preset or override is invalid."""


class SourceError(PipelineError):
    """A source (directory, archive, links file, bucket) cannot be found or read."""


class ImageDecodeError(PipelineError):
    """Bytes that are not a usable image: empty, truncated, corrupt, too large, or not an image at all."""

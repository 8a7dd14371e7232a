"""Source readers: stream samples out of SA-1B, JourneyDB and ImageNet shards without extracting archives.

Importing this package registers every source (`storage.sources.base.register`); a new dataset adds its module
to the import below.
"""

from storage.sources import imagenet, journeydb, sa1b  # noqa: F401 - registers the sources
from storage.sources.base import Source, SourceSample, SourceShard, get_source, source_names

__all__ = ["Source", "SourceSample", "SourceShard", "get_source", "source_names"]

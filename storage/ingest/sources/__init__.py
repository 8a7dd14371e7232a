"""Source readers: stream samples out of SA-1B, JourneyDB and ImageNet shards without extracting archives.

The protocol and registry: `base.py`; one reader per dataset: `sa1b.py`, `journeydb.py`, `imagenet.py`. Importing this
package registers every source (`storage.ingest.sources.base.register`); a new dataset adds its module to the import
below.
"""

from storage.ingest.sources import imagenet, journeydb, sa1b  # noqa: F401 - registers the sources
from storage.ingest.sources.base import Source, SourceSample, SourceShard, captioned, get_source, source_names

__all__ = ["Source", "SourceSample", "SourceShard", "captioned", "get_source", "source_names"]

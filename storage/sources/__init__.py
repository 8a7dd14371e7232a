"""Source readers: stream samples out of SA-1B, JourneyDB and ImageNet shards without extracting archives."""

from storage.sources.base import SourceSample, SourceShard

__all__ = ["SourceSample", "SourceShard"]

"""Text-to-image training library (models, buckets, features, loader, loss). Filled in by later issues."""

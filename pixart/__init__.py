"""pixart package."""

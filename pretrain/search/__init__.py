"""Text-to-image search: an ANN index over the shards, a query CLI and a search page."""

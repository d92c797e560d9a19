"""Retrieval: the ANN index over the tagging output and search over it (text, audio and clip queries, filters)."""

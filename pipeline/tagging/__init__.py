"""Tagging: the batch job that decodes, featurizes, tags and embeds audio files and commits its tables."""

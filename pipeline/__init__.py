"""Batch audio tagging (AST) and audio-text embedding (CLAP) over Ray Data."""

__version__ = "0.1.0"

"""Reading input bytes through fsspec; storage failures become per-file errors with a reason."""

from __future__ import annotations

import fsspec

from pipeline.decode import DecodeError


def read_bytes(uri: str) -> bytes:
    """All bytes of `uri` (local path or any fsspec URL); DecodeError names the storage problem."""
    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise DecodeError("file not found", f"removed after listing? {e}") from e
    except PermissionError as e:
        raise DecodeError("permission denied reading file", str(e)) from e
    except IsADirectoryError as e:
        raise DecodeError("path is a directory, not a file", str(e)) from e
    except OSError as e:
        raise DecodeError("storage error reading file", f"{type(e).__name__}: {e}") from e

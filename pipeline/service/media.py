"""Serving original audio files from their storage: content types, HTTP byte ranges, chunked reads.

Files are read through fsspec from the URI the tagging job recorded (local path, s3://, gs://, ...),
so a service never needs a local copy. Only single byte ranges are served (what <audio> elements send);
a Range header with several ranges is ignored and the whole file sent, as RFC 9110 allows.
"""

from __future__ import annotations

import logging
import mimetypes
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
AUDIO_TYPES = {
    ".wav": "audio/wav", ".wave": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".oga": "audio/ogg",
    ".opus": "audio/ogg", ".mp3": "audio/mpeg", ".m4a": "audio/mp4", ".mp4": "audio/mp4", ".aac": "audio/aac",
    ".webm": "audio/webm", ".aif": "audio/aiff", ".aiff": "audio/aiff", ".wma": "audio/x-ms-wma",
    ".amr": "audio/amr", ".au": "audio/basic", ".caf": "audio/x-caf", ".mka": "audio/x-matroska",
}
_RANGE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


class RangeNotSatisfiable(ValueError):
    """The Range header asks for bytes the file does not have (or is malformed): HTTP 416."""


@dataclass(frozen=True)
class ByteRange:
    """Inclusive [start, end] byte offsets, as in Content-Range."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def content_type(uri: str) -> str:
    """Media type from the file extension; audio types first, then the platform's table."""
    ext = posixpath.splitext(uri.split("?", 1)[0])[1].lower()
    return AUDIO_TYPES.get(ext) or mimetypes.guess_type(f"x{ext}")[0] or "application/octet-stream"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The byte range a `Range` header asks of a `size`-byte file; None means "send everything"."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None  # unknown range units are ignored (RFC 9110 14.2)
    if "," in spec:
        return None  # multiple ranges: we send the whole file instead of multipart/byteranges
    match = _RANGE.match(spec)
    if not match or match.groups() == ("", ""):
        raise RangeNotSatisfiable(f"malformed range {header!r}")
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header!r} selects no bytes of a {size}-byte file")
        return ByteRange(max(0, size - n), size - 1)
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        raise RangeNotSatisfiable(f"malformed range {header!r}: end before start")
    if start >= size:
        raise RangeNotSatisfiable(f"range {header!r} starts beyond the end of a {size}-byte file")
    return ByteRange(start, end)


class SourceFile:
    """One stored file: `size` in bytes, and `read(range)` yielding its bytes in chunks."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = fsspec.core.url_to_fs(uri)
        info = self.fs.info(self.path)
        if info.get("type") == "directory":
            raise IsADirectoryError(uri)
        self.size = int(info["size"])

    def read(self, byte_range: ByteRange | None) -> Iterator[bytes]:
        start, remaining = (0, self.size) if byte_range is None else (byte_range.start, byte_range.length)
        with self.fs.open(self.path, "rb") as f:
            f.seek(start)
            while remaining > 0:
                chunk = f.read(min(CHUNK_BYTES, remaining))
                if not chunk:
                    log.warning("%s ended %d bytes early (changed since it was sized?)", self.uri, remaining)
                    return
                remaining -= len(chunk)
                yield chunk

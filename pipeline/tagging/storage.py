"""Reading input bytes through fsspec, with retries; storage failures become per-file reasons.

Transient failures (5xx, throttling, connection resets: whatever the filesystem raises that is not
"not found", "permission denied" or "is a directory") are retried with exponential backoff; s3fs and
botocore retry some of them underneath as well. A file that still cannot be read raises DecodeError
naming the storage error, and becomes an error row; nothing else in the job is affected.

`ReadAhead` reads the next files of a featurize task in background threads while the current one is
decoded and featurized, so object-storage latency (tens of ms per GET) overlaps that CPU work instead
of idling the task's core.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

from pipeline.tagging.decode import DecodeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryConfig:
    """Attempts per file; backoff in seconds, doubled after each failed attempt, capped."""

    attempts: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0


def read_bytes(uri: str, retry: RetryConfig = RetryConfig()) -> bytes:
    """All bytes of `uri` (local path or any fsspec URL); DecodeError names the storage problem."""
    last: BaseException | None = None
    for attempt in range(1, retry.attempts + 1):
        try:
            if plain_path(uri):  # fsspec's local file layer costs ~1 ms per 1.3 MB file over open()
                with open(uri, "rb") as f:
                    return f.read()
            import fsspec  # here: the decoder child imports this module and reads local paths only

            with fsspec.open(uri, "rb") as f:
                return f.read()
        except FileNotFoundError as e:
            raise DecodeError("file not found", f"removed after listing? {e}") from e
        except PermissionError as e:
            raise DecodeError("permission denied reading file", str(e)) from e
        except IsADirectoryError as e:
            raise DecodeError("path is a directory, not a file", str(e)) from e
        except Exception as e:  # any other failure of the storage layer is worth another attempt
            last = e
            if attempt < retry.attempts:
                delay = min(retry.max_backoff_s, retry.backoff_s * 2 ** (attempt - 1))
                log.warning("read %s failed (%s: %s); retry %d/%d in %.1f s", uri, type(e).__name__, e,
                            attempt, retry.attempts - 1, delay)
                time.sleep(delay)
    raise DecodeError("storage error reading file",
                      f"{type(last).__name__}: {last} (after {retry.attempts} attempts)") from last


def plain_path(uri: str) -> bool:
    """A local path that `open` reads exactly as fsspec would: no protocol, no chaining, no `~`."""
    return "://" not in uri and "::" not in uri and not uri.startswith(("~", "file:"))


# Bytes of listed files read ahead of the one being featurized, at most (by listed size); a file that
# does not fit is read when its turn comes. featurize.task_memory_bytes counts this once per task.
READ_AHEAD_BYTES = 64 << 20
READ_AHEAD_THREADS = 4


class ReadAhead:
    """Iterate `(file, data)` over listing rows in order: `data` is the file's bytes, read ahead in
    background threads while earlier files are processed, or the DecodeError its read raised, or None
    where nothing is read here: a plain local path (the decoder child reads it itself), a row with a
    `listing_error`, or `max_bytes` 0 (no read-ahead: the caller reads). Files beyond the current one
    are read ahead while their listed `size_bytes` (unknown counts as `max_bytes`) fit in `max_bytes`
    together; a file that does not fit is read when its turn comes."""

    def __init__(self, files: list[dict], max_bytes: int = READ_AHEAD_BYTES, threads: int = READ_AHEAD_THREADS):
        self.files, self.max_bytes, self.threads = files, max_bytes, threads

    def __iter__(self) -> Iterator[tuple[dict, bytes | DecodeError | None]]:
        files = self.files
        if self.max_bytes <= 0 or not any(_remote(f) for f in files):
            for file in files:
                yield file, None
            return
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="read-ahead")
        pending: deque[tuple[dict, Future | None, int]] = deque()
        queued, ahead = 0, 0  # files taken into `pending`; listed bytes of theirs being read

        def fill() -> None:
            nonlocal queued, ahead
            while queued < len(files) and len(pending) <= 8 * self.threads:
                file = files[queued]
                size = _listed_size(file, self.max_bytes) if _remote(file) else 0
                if size and pending and ahead + size > self.max_bytes:
                    return  # does not fit beside the others: read when its turn comes
                pending.append((file, pool.submit(_read_or_error, file["uri"]) if size else None, size))
                queued, ahead = queued + 1, ahead + size

        try:
            while pending or queued < len(files):
                if not pending:
                    fill()  # with nothing pending, the next file is taken whatever its size
                file, future, size = pending.popleft()
                ahead -= size
                fill()  # the next reads start before this one is waited for
                yield file, (future.result() if future else None)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def _remote(file: dict) -> bool:
    return not file.get("listing_error") and not plain_path(file["uri"])


def _listed_size(file: dict, unknown: int) -> int:
    size = file.get("size_bytes")
    return max(1, size) if isinstance(size, int) and size >= 0 else max(1, unknown)


def _read_or_error(uri: str) -> bytes | DecodeError:
    try:
        return read_bytes(uri)
    except DecodeError as e:
        return e

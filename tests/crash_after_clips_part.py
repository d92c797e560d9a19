"""Fault injection: `python -m tests.crash_after_clips_part ARGS` runs `jobs.tag ARGS` and SIGKILLs its own
process group (the driver and the local Ray it started) the moment its first clips part file is complete:
a crash right after one flush, before anything that would follow it."""

from __future__ import annotations

import os
import signal
import sys

from jobs import tag
from pipeline import writer

_flush = writer.PartWriter.flush


def _flush_then_crash(self: writer.PartWriter) -> None:
    _flush(self)
    if self.directory.rsplit("/", 2)[-2] == "clips" and self.files:
        os.killpg(os.getpgid(0), signal.SIGKILL)


writer.PartWriter.flush = _flush_then_crash

if __name__ == "__main__":
    sys.exit(tag.main())

"""Fault injection: `python -m tests.crash_after_clips_part ARGS` runs `jobs.tag ARGS` and SIGKILLs its own
process group (the driver and the local Ray it started, workers included) the moment a first complete
clips part file appears under OUTPUT/clips/RUN_ID/: a crash right after one part is written, wherever
it was written (a worker's sink task or the driver), before anything that would follow it."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from jobs import tag


def _crash_after_first_clips_part(output: str, run_id: str) -> None:
    directory = Path(output) / "clips" / run_id
    while not any(directory.glob("part-*.parquet")):
        time.sleep(0.005)
    os.killpg(os.getpgid(0), signal.SIGKILL)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--run-id", required=True)
    known, _ = parser.parse_known_args()
    threading.Thread(target=_crash_after_first_clips_part, args=(known.output, known.run_id), daemon=True).start()
    sys.exit(tag.main())

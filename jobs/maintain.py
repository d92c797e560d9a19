"""Compact, checkpoint and vacuum a tagging OUTPUT's Delta tables: `python -m jobs.maintain --output OUT`.

Refused (exit status 4) while a run holds OUTPUT's lease; a tagging run started meanwhile is refused too."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.exits import Exit, guarded
from pipeline.store.lease import Lease
from pipeline.store.maintain import MaintainConfig, maintain

log = logging.getLogger("jobs.maintain")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.maintain", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="the tagging job's output root (local path or URI)")
    p.add_argument("--small-rows", type=int, default=MaintainConfig.small_rows,
                   help="data files with fewer rows are merged")
    p.add_argument("--target-rows", type=int, default=MaintainConfig.target_rows, help="rows per merged file")
    p.add_argument("--retention-hours", type=float, default=MaintainConfig.retention_hours,
                   help="vacuum keeps what versions of the last this many hours need (time travel, earlier "
                        "settings); whole hours, rounded up")
    p.add_argument("--no-vacuum", action="store_true", help="compact and checkpoint only")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = MaintainConfig(args.output, args.small_rows, args.target_rows, args.retention_hours, not args.no_vacuum)
    def run() -> dict:
        with Lease(args.output, "maintenance", purpose="maintain") as lease:
            return maintain(cfg, check=lease.check)

    status, report = guarded(run, log)
    if status is not None:
        return status
    sys.stdout.write(json.dumps(report) + "\n")
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())

"""Build or update the ANN search index next to the tagging output: `python -m jobs.index --output OUT`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.index import AnnConfig, build_index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.index", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="the tagging job's output root (local path or URI)")
    p.add_argument("--rebuild", action="store_true", help="rebuild from scratch instead of appending new rows")
    p.add_argument("--m", type=int, default=AnnConfig.m, help="HNSW graph degree")
    p.add_argument("--ef-construction", type=int, default=AnnConfig.ef_construction, help="HNSW build beam")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = build_index(args.output, rebuild=args.rebuild, ann=AnnConfig(m=args.m, ef_construction=args.ef_construction))
    sys.stdout.write(json.dumps({k: info[k] for k in ("rows", "live", "commits", "model")}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build or update the ANN search index next to the tagging output: `python -m jobs.index --output OUT`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.retrieval.ann import AnnConfig
from pipeline.retrieval.calibrate import CalibrationConfig
from pipeline.retrieval.index import build_index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.index", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="the tagging job's output root (local path or URI)")
    p.add_argument("--rebuild", action="store_true", help="rebuild from scratch instead of appending new rows")
    p.add_argument("--nlist", type=int, help="IVF lists (default: 4 sqrt(rows) as a power of two, at most "
                                             f"{AnnConfig.max_nlist})")
    p.add_argument("--project-dim", type=int, default=AnnConfig.project_dim,
                   help="IVF-PQ works on this many leading directions of the embeddings (0: all of them); "
                        "re-ranking always uses the full vectors")
    p.add_argument("--pq-m", type=int, default=AnnConfig.pq_m,
                   help="PQ sub-quantizers per row (divides --project-dim, or the dimension)")
    p.add_argument("--min-rows", type=int, default=AnnConfig.min_rows, help="tables smaller than this get no ANN")
    p.add_argument("--target-recall", type=float, default=CalibrationConfig.target_recall,
                   help="calibrate the ANN's re-rank depth (and probes) so that label-prompt text queries reach "
                        "this recall@10 against exact search; the search defaults to the chosen settings")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = build_index(args.output, rebuild=args.rebuild, ann=AnnConfig(
        nlist=args.nlist, project_dim=args.project_dim, pq_m=args.pq_m, min_rows=args.min_rows),
        calibration=CalibrationConfig(target_recall=args.target_recall))
    calibration = {t: {k: v for k, v in e["calibration"].items() if k != "measured"} for t, e in info["tables"].items()}
    sys.stdout.write(json.dumps({**{k: info[k] for k in ("rows", "live", "versions", "model")},
                                 "calibration": calibration}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

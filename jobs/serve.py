"""Serve search over a tagging output: JSON API, web page, /metrics.

    python -m jobs.serve --output OUT [--host 127.0.0.1] [--port 8000]

Binds to loopback by default; put a reverse proxy (TLS, auth) in front before using --host 0.0.0.0.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.retrieval.search import SearchError
from pipeline.service.service import serve

log = logging.getLogger("jobs.serve")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", "--index", dest="output", required=True,
                   help="the tagging job's output root (local path or URI), with _index/ (--index: its older name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--exact", action="store_true", help="exact search even when the ANN index is current")
    p.add_argument("--clap-model", help="refuse to start unless the index was embedded with this CLAP source")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(args.output, host=args.host, port=args.port, exact=args.exact, clap_model=args.clap_model)
    except (SearchError, FileNotFoundError, LookupError) as e:
        log.error("cannot serve %s: %s", args.output, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

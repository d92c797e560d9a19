"""Run the tagging job on local defaults: a generated sample corpus and small UNTRAINED checkpoints
of the real AST and CLAP architectures, all built locally under ./demo (no network)."""

from __future__ import annotations

import argparse
import logging
import sys

from jobs import tag
from pipeline.demo import prepare_demo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__)
    p.add_argument("--root", default="demo", help="directory for the corpus, checkpoints and output")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = prepare_demo(args.root)
    return tag.main(["--input", paths["input"], "--output", paths["output"],
                     "--ast-model", paths["ast"], "--clap-model", paths["clap"]])


if __name__ == "__main__":
    sys.exit(main())

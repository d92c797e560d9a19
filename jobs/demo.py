"""Run the tagging job on local defaults: a generated sample corpus and small UNTRAINED checkpoints
of the real AST and CLAP architectures, all built locally under ./demo (no network); then index the
output, search it by text, and say how to serve the page and run on your own files."""

from __future__ import annotations

import argparse
import logging
import sys

from jobs import tag
from jobs.exits import Exit
from pipeline.demo import prepare_demo

QUERY = "a dog barking"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__)
    p.add_argument("--root", default="demo", help="directory for the corpus, checkpoints and output")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = prepare_demo(args.root)
    status = tag.main(["--input", paths["input"], "--output", paths["output"],
                       "--ast-model", paths["ast"], "--clap-model", paths["clap"]])
    if status not in (Exit.OK, Exit.BROKEN):
        return status
    show(paths["output"])
    return status


def show(output: str) -> None:
    """Index the demo output, run one text search over it, and print the hits and the next commands."""
    from pipeline.retrieval.index import build_index
    from pipeline.retrieval.search import Searcher

    build_index(output)
    hits = Searcher(output).text(QUERY, k=3)
    lines = [f'\nSearch "{QUERY}" over {output} (untrained demo models: the ranking means nothing yet):']
    lines += [f"  {h.score:6.3f}  {h.uri}  window {h.start_s:.1f}-{h.end_s:.1f} s" for h in hits]
    lines += ["Next:",
              f"  .venv/bin/python -m jobs.serve --output {output}       # the search page, http://127.0.0.1:8000",
              f"  .venv/bin/python -m jobs.search --output {output} --text 'rain on a roof'",
              "  .venv/bin/python -m jobs.tag --input /your/audio --output /your/tags   # published models"]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""Search tagged audio: by text, by example audio, more-like-this; zero-shot labels; near-duplicates.

    python -m jobs.search --output OUT --text "dog barking in the rain" [--k 10] [--json]
    python -m jobs.search --output OUT --audio query.wav
    python -m jobs.search --output OUT --like CLIP_ID [--label Dog --min-score 0.3] [--segments]
    python -m jobs.search --output OUT --zero-shot labels.txt
    python -m jobs.search --output OUT --duplicates 0.95
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import fsspec

from pipeline.checkpoints import DEFAULT_PROMPT
from pipeline.retrieval.ann import AnnConfig
from pipeline.retrieval.search import Filters, Searcher, SearchError

MAX_QUERY_CHARS = 1000
MAX_K = 1000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", "--index", dest="output", required=True,
                   help="the tagging job's output root, with _index/ from jobs.index (--index: its older name)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="free-text query (CLAP text tower of the indexed model)")
    q.add_argument("--audio", help="path or URI of an audio file to search by example")
    q.add_argument("--like", metavar="CLIP_ID", help="clips similar to this indexed clip")
    q.add_argument("--zero-shot", metavar="LABELS_FILE", help="score each clip against labels (one per line)")
    q.add_argument("--duplicates", type=float, metavar="THRESHOLD", help="pairs of clips with cosine >= THRESHOLD")
    p.add_argument("--k", type=int, default=10, help=f"number of hits (1..{MAX_K})")
    p.add_argument("--segments", action="store_true", help="hits are windows (start_s, end_s), not whole clips")
    p.add_argument("--label", help="keep clips whose AST score for this label is >= --min-score")
    p.add_argument("--min-score", type=float, default=0.3, help="threshold for --label")
    p.add_argument("--min-duration", type=float, help="keep clips at least this long (seconds)")
    p.add_argument("--uri-prefix", help="keep clips whose URI starts with this")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="zero-shot prompt template")
    p.add_argument("--exact", action="store_true", help="exact search even when the ANN index is current")
    p.add_argument("--rerank", type=int,
                   help="ANN candidates re-scored exactly per hit asked for (more: higher recall for queries unlike "
                        "the audio rows, e.g. text, at some latency: BENCHMARKS.md, Search); default: the depth "
                        f"jobs.index calibrated for text queries, else {AnnConfig.rerank}")
    p.add_argument("--clap-model", help="refuse to run unless the index was embedded with this CLAP source")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    if not 1 <= args.k <= MAX_K:
        p.error(f"--k must be between 1 and {MAX_K}")
    if args.rerank is not None and args.rerank < 1:
        p.error("--rerank must be at least 1")
    if args.text is not None and not 0 < len(args.text) <= MAX_QUERY_CHARS:
        p.error(f"--text must have 1 to {MAX_QUERY_CHARS} characters")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        searcher = Searcher(args.output, exact=args.exact, clap_model=args.clap_model, rerank=args.rerank)
        sys.stderr.write(describe(searcher.settings(), args.rerank is not None) + "\n")
        rows = _run(searcher, args)
    except SearchError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    _print(rows, args.json)
    return 0


def describe(settings: dict, given: bool) -> str:
    """One line on how unfiltered queries are answered and how the index calibrated that (Searcher.settings)."""
    c = settings["calibration"]
    if settings["exact"] or c.get("needed") is False:
        return "search: exact" + ("" if settings["exact"] else " (index too small for an ANN: no calibration needed)")
    line = f"search: ANN, re-rank {settings['rerank']} x k" + (" (--rerank)" if given else "")
    if not c:
        return line + f", nprobe {settings['nprobe'] or 'default'} (index not calibrated: run jobs.index)"
    missed = "" if c["reached"] else ", not reached"
    timed = f", {c['ms']:.1f} ms a query at build" if "ms" in c else ""
    return line + (f", nprobe {settings['nprobe']} of {c['nlist']} lists; calibrated at build: re-rank {c['rerank']}, "
                   f"nprobe {c['nprobe']} reach recall@{c['k']} {c['recall']:.3f} against exact search "
                   f"(target {c['target_recall']}{missed}, {c['queries']} label queries{timed})")


def _run(searcher: Searcher, args) -> list[dict]:
    filters = Filters(label=args.label, min_score=args.min_score, min_duration_s=args.min_duration,
                      uri_prefix=args.uri_prefix)
    if args.zero_shot:
        with fsspec.open(args.zero_shot, "r") as f:
            labels = [line.strip() for line in f if line.strip()]
        return searcher.zero_shot(labels, args.prompt)
    if args.duplicates is not None:
        return searcher.duplicates(args.duplicates)
    if args.text is not None:
        hits = searcher.text(args.text, args.k, filters, args.segments)
    elif args.audio:
        with fsspec.open(args.audio, "rb") as f:
            hits = searcher.audio(f.read(), args.k, filters, args.segments)
    else:
        hits = searcher.like(args.like, args.k, filters, args.segments)
    return [h.to_dict() for h in hits]


def _print(rows: list[dict], as_json: bool) -> None:
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    if not rows:
        sys.stdout.write("no results\n")
        return
    columns = list(rows[0])
    cells = [[_cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)) + "\n")
    for row in cells:
        sys.stdout.write("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "\n")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return ", ".join(f"{d['label']} {d['score']:.2f}" for d in value)
    return "" if value is None else str(value)


if __name__ == "__main__":
    sys.exit(main())

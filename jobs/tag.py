"""Tag and embed audio files: `python -m jobs.tag --input PATH_OR_URI --output PATH_OR_URI`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import fsspec

from pipeline.checkpoints import DEFAULT_AST, DEFAULT_CLAP
from pipeline.tagging.job import TagJobConfig, run_tag_job
from jobs.exits import Exit, status_of

log = logging.getLogger("jobs.tag")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.tag", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True,
                   help="directory (searched recursively for audio extensions), glob, or single file; "
                        "local path or fsspec URI (s3://, gs://, az://, http(s)://)")
    p.add_argument("--output", required=True,
                   help="output root; Parquet parts go to OUTPUT/clips/RUN_ID/ and OUTPUT/segments/RUN_ID/, "
                        "the Delta tables OUTPUT/clips and OUTPUT/segments (the record of what is committed), the lease to "
                        "OUTPUT/_lease/, the summary to OUTPUT/_runs/")
    p.add_argument("--ast-model", default=DEFAULT_AST, help="AST checkpoint: hub id or local directory")
    p.add_argument("--clap-model", default=DEFAULT_CLAP, help="CLAP checkpoint: hub id or local directory")
    p.add_argument("--top-k", type=int, default=5, help="labels kept per clip and per segment")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per model actor call (default: 32 on CPU, 256 on GPU)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="windows per forward pass (default: 1 on CPU, 128 on GPU); fixed and zero-padded so "
                        "results never depend on batching")
    p.add_argument("--hop", type=float, default=10.0, help="seconds between window starts (0 < hop <= 10)")
    p.add_argument("--num-gpus", default="auto",
                   help="GPU share per model actor: auto (0.5 when the cluster has GPUs, else CPU), 0, or F")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="model precision, part of the settings: auto is bf16 when the models get GPUs (weights "
                        "cast, no autocast), else fp32; fp32 keeps parity with the HF float32 reference within "
                        "1e-4; a rerun with another precision reprocesses every file (README, Reruns)")
    p.add_argument("--ast-actors", type=int, default=None, help="AST actor pool size (default from GPUs, else 1)")
    p.add_argument("--clap-actors", type=int, default=None, help="CLAP actor pool size (default as AST)")
    p.add_argument("--zero-shot", metavar="LABELS_FILE",
                   help="also score each clip against these labels (one per line) with CLAP's text tower")
    p.add_argument("--zero-shot-prompt", default="This is a sound of {label}.",
                   help="prompt template for --zero-shot; {label} is replaced by each label")
    p.add_argument("--flush-every", type=float, default=60.0,
                   help="seconds between part-file writes; bounds the work a killed run loses")
    p.add_argument("--max-error-rate", type=float, default=None, metavar="FRACTION",
                   help="exit 1 when more than this fraction of the processed files are error rows (their rows "
                        "are still written and committed); a run whose processed files all failed for a "
                        "transient reason exits 1 whatever this is")
    p.add_argument("--rows-per-file", type=int, default=20_000,
                   help="most windows per part file: the workers write a part per batch of min(this, 8 x "
                        "--batch-size) windows; the driver's own parts (files split across batches) hold this many")
    p.add_argument("--shard-files", type=int, default=100_000,
                   help="files per commit: the listing streams and each shard of this many new or changed files "
                        "is processed and committed to the Delta tables before the next (a kill loses at most "
                        "the shard in flight, whose files the next run processes again)")
    p.add_argument("--long-file-s", type=float, default=1200.0,
                   help="featurize tasks reserve memory for files up to this many seconds; longer files run "
                        "afterwards in a lane whose tasks reserve it for the longest accepted file (6 h)")
    p.add_argument("--stall-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="fail the run when no stage makes progress this long (e.g. an actor that no node can "
                        "hold) instead of waiting; -1 waits forever")
    p.add_argument("--replace-settings", action="store_true",
                   help="when this run's settings (models, features, precision, top-k) differ from the table's: "
                        "reprocess every file and swap the new table in when the run ends (without it such a run "
                        "is refused with exit status 6, naming what differs)")
    p.add_argument("--run-id", default=None, help="name of this run (default: UTC time plus random suffix)")
    p.add_argument("--log-level", default="INFO", help="logging level")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    num_gpus = args.num_gpus if args.num_gpus == "auto" else float(args.num_gpus)
    extra = {"run_id": args.run_id} if args.run_id else {}
    if args.zero_shot:
        with fsspec.open(args.zero_shot, "r") as f:
            extra["zero_shot_labels"] = tuple(line.strip() for line in f if line.strip())
    cfg = TagJobConfig(input=args.input, output=args.output, ast_model=args.ast_model,
                       clap_model=args.clap_model, top_k=args.top_k, batch_size=args.batch_size,
                       micro_batch=args.micro_batch, hop_s=args.hop, num_gpus=num_gpus, precision=args.precision,
                       ast_actors=args.ast_actors, clap_actors=args.clap_actors,
                       flush_every_s=args.flush_every, max_error_rate=args.max_error_rate,
                       rows_per_file=args.rows_per_file, shard_files=args.shard_files, long_file_s=args.long_file_s,
                       stall_timeout_s=args.stall_timeout,
                       zero_shot_prompt=args.zero_shot_prompt, replace_settings=args.replace_settings, **extra)
    try:
        summary = run_tag_job(cfg)
    except Exception as e:
        status = status_of(e)
        if status is None:
            raise
        log.error("%s", e)
        return status
    sys.stdout.write(json.dumps(summary) + "\n")
    return Exit.OK if summary["succeeded"] else Exit.BROKEN


if __name__ == "__main__":
    sys.exit(main())

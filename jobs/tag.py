"""Tag and embed audio files: `python -m jobs.tag --input PATH_OR_URI --output PATH_OR_URI`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import fsspec

from jobs.exits import Exit, guarded
from pipeline.tagging.featurize import FEATURES_ON
from pipeline.tagging.job import TagJobConfig, run_tag_job
from pipeline.tagging.progress import quiet_ray_data

log = logging.getLogger("jobs.tag")
D = TagJobConfig   # every default is the config's own (written once, there)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (None means "decided per run", said in the help)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _positive(kind):
    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    check.__name__ = kind.__name__
    return check


def _hop(text: str) -> float:
    hop = _positive(float)(text)
    if hop > 10:
        raise argparse.ArgumentTypeError(f"must be at most 10 s (the CLAP window), got {text}")
    return hop


def _gpus(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'auto' or a GPU share like 0.5, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a fraction of the processed files (0 <= f <= 1), got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.tag", description=__doc__, formatter_class=_Help)
    io = p.add_argument_group("input and output")
    io.add_argument("--input", required=True,
                    help="directory (searched recursively for audio extensions), glob, single file, or manifest "
                         "(.parquet/.csv with a uri column, .txt one URI per line); local path or fsspec URI "
                         "(s3://, gs://, az://, http(s)://)")
    io.add_argument("--output", required=True,
                    help="output root: the Delta tables OUTPUT/clips and OUTPUT/segments (the record of what is "
                         "committed; their data files under OUTPUT/{clips,segments}/RUN_ID/), the lease "
                         "OUTPUT/_lease/, run summaries OUTPUT/_runs/")
    io.add_argument("--run-id", default=None, help="name of this run (default: UTC time plus a random suffix)")
    models = p.add_argument_group("models and settings (pinned per OUTPUT: README, Scheduled runs)")
    models.add_argument("--ast-model", default=D.ast_model, help="AST checkpoint: hub id or local directory")
    models.add_argument("--clap-model", default=D.clap_model, help="CLAP checkpoint: hub id or local directory")
    models.add_argument("--top-k", type=_positive(int), default=D.top_k, help="labels kept per clip and per segment")
    models.add_argument("--hop", type=_hop, default=D.hop_s, help="seconds between window starts (0 < hop <= 10)")
    models.add_argument("--precision", default=D.precision, choices=("auto", "fp32", "bf16"),
                        help="model precision: auto takes the table's when OUTPUT has one, else bf16 when the models "
                             "get GPUs (weights cast, no autocast) and fp32 on CPU; fp32 keeps parity with the HF "
                             "float32 reference within 1e-4")
    models.add_argument("--features-on", default=D.features_on, choices=FEATURES_ON,
                        help="where the AST fbank and CLAP log-mel are computed: cpu (featurize tasks) or gpu (the "
                             "model actors, on their GPU, or their CPU where there is none; the CPU workers then "
                             "only read, decode and resample: for nodes with few cores per GPU)")
    models.add_argument("--zero-shot", metavar="LABELS_FILE",
                        help="also score each clip against these labels (one per line) with CLAP's text tower")
    models.add_argument("--zero-shot-prompt", default=D.zero_shot_prompt,
                        help="prompt template for --zero-shot; {label} is replaced by each label")
    models.add_argument("--replace-settings", action="store_true",
                        help="when these settings differ from the table's: reprocess every file into staging tables "
                             "and swap them in when the run ends (a killed replacement resumes when rerun with "
                             "this flag; without it such a run is refused, exit status 6)")
    run = p.add_argument_group("run behaviour")
    run.add_argument("--shard-files", type=_positive(int), default=D.shard_files,
                     help="files per commit: the run's one execution streams, and every time this many files "
                          "are complete they are committed as a shard (a kill loses only what is not committed)")
    run.add_argument("--flush-every", type=float, default=D.flush_every_s,
                     help="also commit the complete files at least this often, in seconds (bounds what a kill "
                          "loses when files complete slowly)")
    run.add_argument("--max-error-rate", type=_fraction, default=None, metavar="FRACTION",
                     help="exit 1 when more than this fraction of the processed files are error rows (their rows "
                          "are still committed); a run whose processed files all failed for a transient reason "
                          "exits 1 whatever this is (default: off)")
    run.add_argument("--stall-timeout", type=float, default=D.stall_timeout_s, metavar="SECONDS",
                     help="fail the run when no stage makes progress this long (e.g. an actor that no node can "
                          "hold) instead of waiting; -1 waits forever")
    run.add_argument("--log-level", default="INFO", help="logging level (DEBUG adds Ray Data's operator dumps)")
    res = p.add_argument_group("resources and batching (not settings: results do not depend on them)")
    res.add_argument("--num-gpus", type=_gpus, default=D.num_gpus,
                     help="GPU share per model actor: auto (0.5 when the cluster has GPUs, else CPU), 0, or F")
    res.add_argument("--ast-actors", type=_positive(int), default=None,
                     help="AST actor pool size (default: from the cluster's shape)")
    res.add_argument("--clap-actors", type=_positive(int), default=None, help="CLAP actor pool size (default as AST)")
    res.add_argument("--batch-size", type=_positive(int), default=None,
                     help="windows per model actor call (default: 32 on CPU, 256 on GPU)")
    res.add_argument("--micro-batch", type=_positive(int), default=None,
                     help="windows per forward pass (default: 1 on CPU, 128 on GPU); fixed and zero-padded so "
                          "results never depend on batching")
    res.add_argument("--rows-per-file", type=_positive(int), default=D.rows_per_file,
                     help="most windows per part file: the workers write a part per batch of min(this, 8 x "
                          "--batch-size) windows")
    res.add_argument("--long-file-s", type=_positive(float), default=D.long_file_s,
                     help="featurize tasks reserve memory for files up to this many seconds; longer files run "
                          "afterwards in a lane whose tasks reserve it for the longest accepted file (6 h)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_ray_data(logging.getLogger().getEffectiveLevel())
    extra = {"run_id": args.run_id} if args.run_id else {}
    try:
        if args.zero_shot:
            with fsspec.open(args.zero_shot, "r") as f:
                extra["zero_shot_labels"] = tuple(line.strip() for line in f if line.strip())
        cfg = TagJobConfig(input=args.input, output=args.output, ast_model=args.ast_model,
                           clap_model=args.clap_model, top_k=args.top_k, batch_size=args.batch_size,
                           micro_batch=args.micro_batch, hop_s=args.hop, num_gpus=args.num_gpus,
                           precision=args.precision, ast_actors=args.ast_actors, clap_actors=args.clap_actors,
                           flush_every_s=args.flush_every, max_error_rate=args.max_error_rate,
                           rows_per_file=args.rows_per_file, shard_files=args.shard_files,
                           long_file_s=args.long_file_s, stall_timeout_s=args.stall_timeout,
                           zero_shot_prompt=args.zero_shot_prompt, replace_settings=args.replace_settings,
                           features_on=args.features_on, **extra)
    except (OSError, ValueError) as e:   # an unreadable labels file, a bad run id: usage errors, before Ray
        log.error("%s", e)
        return Exit.USAGE
    status, summary = guarded(lambda: run_tag_job(cfg), log)
    if status is not None:
        return status
    sys.stdout.write(json.dumps(summary) + "\n")
    return Exit.OK if summary["succeeded"] else Exit.BROKEN


if __name__ == "__main__":
    sys.exit(main())

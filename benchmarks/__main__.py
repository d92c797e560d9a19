"""Run every benchmark back to back and write benchmarks/results/*.json:

    python -m benchmarks          # features, GPU sizing, job throughput (tiny models), CPU cost per clip,
                                  # driver ceiling, part files, listing, memory at 1x/10x, search at 100k (~15 min on 2 cores)
    python -m benchmarks --full   # also full-size models (job, model-only bound, precision options,
                                  # naive loop), the one-node benchmark and search at 1M (~40 min more)
"""

from __future__ import annotations

import argparse
import logging

from benchmarks import (cpu_cost, driver, features, gpu_sizing, job_throughput, listing, memory, models, node, part_files,
                        search)

log = logging.getLogger("benchmarks")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    log.info("== feature stage, one thread ==")
    features.main([])
    log.info("== GPU sizing on paper (FLOPs per window, feature rate per core) ==")
    gpu_sizing.main([])
    log.info("== job throughput, tiny random-weight models ==")
    job_throughput.main(["--size", "tiny"])
    if args.full:
        log.info("== job throughput, full-size random-weight models ==")
        job_throughput.main(["--size", "full"])
        log.info("== models alone: micro-batches, CPU precision options, naive per-file loop ==")
        models.main(["--size", "full"])
    log.info("== CPU cost per clip of the job against the one-thread floor (needs a quiet machine) ==")
    cpu_cost.main([])
    if args.full:
        log.info("== one node: job, model-only bound, DataLoader script (GPU sizes when CUDA is visible) ==")
        node.main([])
    log.info("== the driver's aggregate-and-write ceiling and the skip check ==")
    driver.main([])
    log.info("== part files: Parquet writes and reads with and without float dictionaries ==")
    part_files.main([])
    log.info("== listing a manifest and the skip check, streamed (100k rows; --rows 10000000 by hand) ==")
    listing.main([])
    log.info("== peak memory of a job at 1x and 10x corpus size ==")
    memory.main([])
    log.info("== search ==")
    search.main(["--n", "100000", *(["1000000"] if args.full else [])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

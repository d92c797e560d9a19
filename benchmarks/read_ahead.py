"""Featurize over object storage: reading each file in its turn against reading ahead (storage.ReadAhead).

A featurize task holds one logical CPU; when it reads a file from object storage only when its turn
comes, the core idles for the GET's latency. This runs one `Featurize` (as one task runs it: real
decoder child, real features) over 10 s 44.1 kHz stereo FLAC clips on moto's S3 server behind a proxy
that delays each object GET by `--delay-ms` (an object store's first-byte latency; moto's own comes on
top), with read-ahead off (`read_ahead_bytes=0`) and on (the default budget), alternating, and reports
clips/s (wall) and the task's CPU ms per clip (this process + its decoder child + read threads).

Usage: python -m benchmarks.read_ahead [--files 32] [--delay-ms 0 50] [--repeats 2]
       [--out benchmarks/results/read_ahead.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import child_cpu_s, machine, write_result
from benchmarks.corpus import make_corpus

log = logging.getLogger("benchmarks.read_ahead")
BUCKET = "bench"


def run_once(featurize, listed, decoder) -> tuple[float, float, int]:
    """Wall s, CPU s (this process and the decoder child), ok rows of one pass over the listing."""
    import pyarrow as pa

    wall0, cpu0, child0 = time.perf_counter(), time.process_time(), child_cpu_s(decoder.pid)
    rows = pa.concat_tables(featurize(listed))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return wall, cpu + child_cpu_s(decoder.pid) - child0, rows["status"].to_pylist().count("ok")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=32)
    p.add_argument("--delay-ms", type=float, nargs="+", default=[0.0, 50.0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/read_ahead.json")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    for noisy in ("pipeline", "botocore", "s3fs", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import fsspec

    from benchmarks.features import one_thread
    from pipeline.tagging.featurize import Featurize, FeaturizeConfig
    from pipeline.tagging.isolation import shared_decoder
    from pipeline.tagging.sources import ListingConfig, list_inputs
    from tests.s3 import FlakyProxy, MotoS3, _forget_s3_filesystems

    results = []
    with tempfile.TemporaryDirectory() as tmp, MotoS3() as moto:
        make_corpus(Path(tmp), args.files)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=moto.endpoint)
        fs = fsspec.filesystem("s3")
        fs.mkdir(BUCKET)
        fs.put(str(Path(tmp)) + "/", f"{BUCKET}/clips/", recursive=True)
        for delay_ms in args.delay_ms:
            with FlakyProxy(moto.port, prefix=f"/{BUCKET}/clips/", fail_first=0, delay_s=delay_ms / 1000) as proxy:
                os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
                _forget_s3_filesystems()
                listed = list_inputs(ListingConfig(f"s3://{BUCKET}/clips/"))
                modes = {"in_turn": Featurize(FeaturizeConfig(), read_ahead_bytes=0), "ahead": Featurize(FeaturizeConfig())}
                decoder = shared_decoder(modes["ahead"]._decode_config)
                with one_thread():
                    run_once(modes["ahead"], listed.slice(0, 2), decoder)  # decoder child, extractors, connections
                    times = {m: [] for m in modes}
                    for r in range(args.repeats):
                        for m in (modes if r % 2 == 0 else reversed(list(modes))):
                            wall, cpu, ok = run_once(modes[m], listed, decoder)
                            if ok != len(listed):
                                raise RuntimeError(f"{m}: {ok} of {len(listed)} files ok")
                            times[m].append((wall, cpu))
                for m, runs in times.items():
                    wall = float(np.median([w for w, _ in runs]))
                    cpu = float(np.median([c for _, c in runs]))
                    results.append({"delay_ms": delay_ms, "mode": m, "clips_per_s": round(len(listed) / wall, 2),
                                    "wall_ms_per_clip": round(wall / len(listed) * 1000, 2),
                                    "cpu_ms_per_clip": round(cpu / len(listed) * 1000, 2)})
                    log.info("%s", results[-1])
    result = {"benchmark": "read_ahead", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine(), "load_avg_1min_at_end": os.getloadavg()[0], "files": args.files,
              "repeats": args.repeats, "clip": "10 s, 44.1 kHz stereo FLAC, on moto S3 behind a delaying proxy",
              "results": results}
    print(f"one featurize task over {args.files} clips on S3 (moto), {machine()['cpu_model']}")
    print(f"{'added GET latency':>18}{'mode':>10}{'clips/s':>10}{'wall ms/clip':>14}{'CPU ms/clip':>13}")
    for r in results:
        print(f"{r['delay_ms']:>16g}ms{r['mode']:>10}{r['clips_per_s']:>10}{r['wall_ms_per_clip']:>14}"
              f"{r['cpu_ms_per_clip']:>13}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

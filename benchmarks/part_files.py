"""Part files with and without dictionaries on the model outputs: write and read CPU, bytes per window.

The sink writes a segments part and a clips part per batch (pipeline/tagging/sink.py), through
`pipeline.store.writer.write_part`. This times both tables' Parquet writes (zstd) for batches of 32 and
256 one-window files with the published widths (527 scores, 768 + 512 embedding floats), random values
as the tiny models give (real scores and embeddings hardly repeat a value either), with pyarrow's
default (every column dictionary-encoded) and with `dictionary_columns` (no dictionary for floats in
lists); also the sink's whole call (`WriteResults`: aggregate, both writes, to local disk) per window with
each, and reading the three vector columns back (what an index build reads). Median one-thread CPU ms
over `--repeats` calls, the median and range over `--runs` runs.

    python -m benchmarks.part_files [--runs 3] [--repeats 7]
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import machine, write_result

BATCHES = (32, 256)  # windows per sink call: CPU_BATCH, GPU_BATCH
VECTORS = ["scores", "ast_embedding", "clap_embedding"]


def _tables(windows: int):
    """(segments, clips) stored-form tables of one batch of one-window files, and the sink's config."""
    from benchmarks.driver import AST_DIM, CLAP_DIM, NUM_LABELS, TOP_K, _window_batches
    from pipeline.tagging.aggregate import clips_table
    from pipeline.tagging.sink import SinkConfig
    from schemas import clips_schema, segments_schema, stored_schema

    names = tuple(f"label {i}" for i in range(NUM_LABELS))
    dims = (NUM_LABELS, AST_DIM, CLAP_DIM)
    sink = SinkConfig(tempfile.mkdtemp(prefix="part_files_"), "bench", names, TOP_K, segments_schema(*dims),
                      clips_schema(*dims), '{"settings_hash": "bench"}')
    batch = pa.concat_tables(_window_batches(windows, 1))
    segments, clips = sink.aggregator().add(batch)
    return (segments.cast(stored_schema(sink.segments_schema)),
            clips_table(clips, sink.clips_schema).cast(stored_schema(sink.clips_schema)), batch, sink)


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return float(np.median(times)) * 1000


def one_run(repeats: int) -> dict:
    from benchmarks.features import one_thread
    from pipeline.store import writer
    from pipeline.store.writer import dictionary_columns
    from pipeline.tagging.sink import WriteResults

    out = {}
    with one_thread():
        for windows in BATCHES:
            segments, clips, batch, sink = _tables(windows)
            row = {}
            for mode in ("every_column", "no_float_lists"):
                files = {}
                write_ms = 0.0
                for name, table in (("segments", segments), ("clips", clips)):
                    option = True if mode == "every_column" else dictionary_columns(table.schema)

                    def write(table=table, option=option):
                        buf = io.BytesIO()
                        pq.write_table(table, buf, compression="zstd", use_dictionary=option)
                        return buf

                    write_ms += _median_ms(write, repeats)
                    files[name] = write().getvalue()
                    assert pq.read_table(io.BytesIO(files[name])).equals(table)
                read_ms = _median_ms(lambda: pq.read_table(io.BytesIO(files["segments"]), columns=VECTORS), repeats)
                row[mode] = {"write_ms_per_window": write_ms / windows, "read_vectors_ms_per_window": read_ms / windows,
                             "bytes_per_window": sum(len(f) for f in files.values()) / windows}
            sink_call = WriteResults(sink)
            for mode in ("every_column", "no_float_lists"):  # the sink's writes, as before and as now
                writer.dictionary_columns = (lambda schema: True) if mode == "every_column" else dictionary_columns
                try:
                    row[mode]["sink_call_ms_per_window"] = _median_ms(lambda: sink_call(batch), repeats) / windows
                finally:
                    writer.dictionary_columns = dictionary_columns
            out[str(windows)] = row
    return out


def summarize(runs: list[dict]) -> dict:
    """Median and [min, max] over runs of every figure."""
    def walk(values: list):
        if isinstance(values[0], dict):
            return {k: walk([v[k] for v in values]) for k in values[0]}
        return {"median": round(float(np.median(values)), 4), "min": round(min(values), 4),
                "max": round(max(values), 4)}
    return walk(runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/part_files.json")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    runs = [one_run(args.repeats) for _ in range(args.runs)]
    result = {"benchmark": "part_files", "machine": machine(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "runs": args.runs,
              "repeats": args.repeats, "pyarrow": pa.__version__, "figures": summarize(runs), "per_run": runs}
    f = result["figures"]
    print(f"{'windows/batch':>13} {'dictionaries':>15} {'write ms/window':>22} {'sink call ms/window':>22} "
          f"{'read vectors ms/window':>24} {'bytes/window':>14}")
    for windows in map(str, BATCHES):
        for mode in ("every_column", "no_float_lists"):
            r = f[windows][mode]
            cells = [r[k] for k in ("write_ms_per_window", "sink_call_ms_per_window", "read_vectors_ms_per_window")]
            print(f"{windows:>13} {mode:>15} " + " ".join(f"{c['median']:>8.3f} [{c['min']:.3f}, {c['max']:.3f}]"
                                                         for c in cells) + f" {r['bytes_per_window']['median']:>14,.0f}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

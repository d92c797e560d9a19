"""Driver memory of listing a large manifest and skipping the files already done (issue 14).

A manifest of N rows (Parquet with uri, size_bytes, modified, etag; and a .txt of the same URIs, whose
sizes come from storage) and a done table of the IDENTITY columns of its first N/2 rows are written to
a temporary directory, in chunks, so the generator never holds them. Then each variant runs in a fresh
subprocess (clean RSS baseline) and reports its wall time, CPU time and peak RSS growth (VmHWM reset
through /proc/self/clear_refs after the imports, minus VmRSS then):

  old  the code before issue 14 (copied below): the whole manifest read, deduplicated with a Python set
       and turned into one FILE_SCHEMA table; the done table read whole; Arrow `is_in` on a composite
       identity string (pipeline/job.py at cd50b72).
  new  `sources.iter_inputs` chunks (default 100,000 rows) through `skip.DoneSet.new_or_changed`, the
       done set built batch by batch from the done Parquet file; only the counts are kept.

The old path grows with N (~1-2 KB per row); it runs at `--old-rows` (default min(N, 1M)) and is
extrapolated linearly to N, which the table says. The .txt manifest makes every row a `stat` of a
(missing) local file, so it runs at `--txt-rows`.

Usage: python -m benchmarks.listing [--rows 100000] [--old-rows N] [--txt-rows N] [--chunk-rows 100000]
       [--out benchmarks/results/listing.json]
The issue's size (~10-15 min on 2 shared cores; ~1.5 GB of temporary files):
       python -m benchmarks.listing --rows 10000000 --txt-rows 200000 --out benchmarks/results/listing_10m.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks import machine, write_result

log = logging.getLogger("benchmarks.listing")

GENERATE_ROWS = 1_000_000  # rows per generated chunk (and Parquet row group)


def generate(directory: Path, rows: int, txt_rows: int) -> dict[str, str]:
    """manifest.parquet (N rows), manifest.txt (its first txt_rows URIs) and done.parquet (IDENTITY
    columns of the first N/2 rows), written a chunk at a time."""
    from pipeline.store.ledger import IDENTITY

    paths = {"parquet": str(directory / "manifest.parquet"), "txt": str(directory / "manifest.txt"),
             "done": str(directory / "done.parquet")}
    manifest = done = None
    rng = np.random.default_rng(0)
    with open(paths["txt"], "w") as txt:
        for start in range(0, rows, GENERATE_ROWS):
            i = np.arange(start, min(rows, start + GENERATE_ROWS))
            uris = [f"{directory}/audio/{k % 997:03d}/file_{k:09d}.flac" for k in i]
            chunk = pa.table({
                "uri": uris, "size_bytes": pa.array(rng.integers(100_000, 10_000_000, len(i)), pa.int64()),
                "modified": [f"2026-11-{1 + k % 28:02d}T12:34:56+00:00" for k in i],
                "etag": [f"{k:032x}" for k in i]})
            if start < txt_rows:
                txt.write("\n".join(uris[:txt_rows - start]) + "\n")
            manifest = manifest or pq.ParquetWriter(paths["parquet"], chunk.schema)
            manifest.write_table(chunk, row_group_size=GENERATE_ROWS)
            half = chunk.slice(0, max(0, min(len(i), rows // 2 - start)))
            ids = [hashlib.sha256(u.encode()).hexdigest()[:20] for u in half.column("uri").to_pylist()]
            done_chunk = half.append_column("clip_id", pa.array(ids, pa.string())).select(IDENTITY)
            done = done or pq.ParquetWriter(paths["done"], done_chunk.schema)
            done.write_table(done_chunk)
    manifest.close()
    done.close()
    return paths


# The path before issue 14 (pipeline/sources.py and pipeline/job.py at cd50b72), for the baseline.

def old_list_manifest(manifest: str, threads: int = 32) -> pa.Table:
    from pipeline.tagging.sources import FILE_SCHEMA, _modified, _stat, clip_id_for

    table = old_read_manifest(manifest)
    uris = [u.strip() if u else "" for u in table.column("uri").to_pylist()]
    given = {c: table.column(c).to_pylist() for c in ("size_bytes", "modified", "etag") if c in table.column_names}
    seen: set[str] = set()
    first = []
    for i, uri in enumerate(uris):
        if uri and uri not in seen:
            seen.add(uri)
            first.append(i)
    if given.keys() >= {"size_bytes", "modified"}:
        etags = given.get("etag", [None] * len(uris))
        rows = [{"clip_id": clip_id_for(uris[i]), "uri": uris[i], "size_bytes": given["size_bytes"][i],
                 "modified": _modified({"mtime": given["modified"][i]}), "etag": etags[i]} for i in first]
    else:
        with ThreadPoolExecutor(threads) as pool:
            rows = list(pool.map(_stat, [uris[i] for i in first]))
    return pa.Table.from_pylist(rows, schema=FILE_SCHEMA)


def old_read_manifest(manifest: str) -> pa.Table:
    with open(manifest, "rb") as f:
        if manifest.endswith(".parquet"):
            return pq.read_table(f)
        lines = [line.strip() for line in f.read().decode("utf-8").splitlines()]
        return pa.table({"uri": [line for line in lines if line and not line.startswith("#")]})


def old_new_or_changed(listed: pa.Table, done: pa.Table) -> pa.Table:
    from pipeline.tagging.skip import identity_key  # the same key function, moved from job.py

    return listed.filter(pc.invert(pc.is_in(identity_key(listed), value_set=identity_key(done))))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def worker(variant: str, manifest: str, done_path: str, chunk_rows: int) -> dict:
    """Run one variant in this process: rows listed and new, wall and CPU seconds, peak RSS growth."""
    from pipeline.store.ledger import IDENTITY
    from pipeline.tagging.skip import DoneSet
    from pipeline.tagging.sources import ListingConfig, iter_inputs

    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: imports do not count
        f.write("5")
    base = _status_kb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    extra = {}
    if variant == "old":
        listed = old_list_manifest(manifest)
        todo = old_new_or_changed(listed, pq.read_table(done_path, columns=IDENTITY))
        n_listed, n_new = len(listed), len(todo)
    else:
        done = DoneSet(pq.ParquetFile(done_path).iter_batches(batch_size=chunk_rows, columns=IDENTITY))
        extra = {"done_set_bytes": done.keys.nbytes, "chunk_rows": chunk_rows}
        n_listed = n_new = 0
        for chunk in iter_inputs(ListingConfig(manifest), chunk_rows):
            n_listed += len(chunk)
            n_new += len(done.new_or_changed(chunk))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"variant": variant, "manifest": manifest.rsplit(".", 1)[-1], "listed": n_listed,
            "done": pq.ParquetFile(done_path).metadata.num_rows, "new": n_new, "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "peak_rss_growth_bytes": (_status_kb("VmHWM") - base) * 1024, **extra}


def measure(variant: str, manifest: str, done: str, chunk_rows: int) -> dict:
    """`worker` in a fresh subprocess."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.listing", "--worker", variant, "--manifest", manifest,
                           "--done", done, "--chunk-rows", str(chunk_rows)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{variant} worker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])




def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="manifest rows (the done table has half)")
    p.add_argument("--old-rows", type=int, help="rows for the old path (default min(rows, 1M)); extrapolated")
    p.add_argument("--txt-rows", type=int, help="rows of the .txt manifest (each one a stat; default min(rows, 20k))")
    p.add_argument("--chunk-rows", type=int, default=100_000)
    p.add_argument("--out", default="benchmarks/results/listing.json")
    p.add_argument("--worker", choices=["old", "new"], help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--done", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.manifest, args.done, args.chunk_rows)))
        return 0
    logging.basicConfig(level="INFO", format="%(message)s")
    old_rows = min(args.rows, args.old_rows or 1_000_000)
    txt_rows = min(args.rows, args.txt_rows or 20_000)
    load_start = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = {}
        for n in sorted({args.rows, old_rows, txt_rows}):
            directory = Path(tmp) / str(n)
            directory.mkdir()
            start = time.perf_counter()
            sets[n] = generate(directory, n, txt_rows if n == txt_rows else 0)
            log.info("generated %d-row manifest in %.1f s", n, time.perf_counter() - start)
        runs = [("new", "parquet", args.rows), ("new", "parquet", old_rows), ("old", "parquet", old_rows),
                ("new", "txt", txt_rows), ("old", "txt", txt_rows)]
        for variant, kind, n in dict.fromkeys(runs):
            log.info("%s path, %s manifest, %d rows", variant, kind, n)
            results.append({**measure(variant, sets[n][kind], sets[n]["done"], args.chunk_rows), "rows": n})

    print(f"\nListing a manifest and skipping the done half (one subprocess each; chunks of {args.chunk_rows:,})")
    print(f"{'path':>5}{'manifest':>9}{'rows':>12}{'new':>12}{'wall s':>9}{'CPU s':>8}{'peak RSS growth GB':>20}"
          f"{'B/row':>8}")
    for r in results:
        print(f"{r['variant']:>5}{r['manifest']:>9}{r['rows']:>12,}{r['new']:>12,}{r['wall_s']:>9.1f}{r['cpu_s']:>8.1f}"
              f"{r['peak_rss_growth_bytes'] / 1e9:>20.3f}{r['peak_rss_growth_bytes'] / r['rows']:>8.0f}")
    old = next(r for r in results if r["variant"] == "old" and r["manifest"] == "parquet")
    extrapolated = {"rows": args.rows, "from_rows": old["rows"], "assumes": "linear in rows",
                    "peak_rss_growth_bytes": round(old["peak_rss_growth_bytes"] * args.rows / old["rows"]),
                    "wall_s": round(old["wall_s"] * args.rows / old["rows"], 1)}
    if old["rows"] != args.rows:
        print(f"old path at {args.rows:,} rows, extrapolated linearly from {old['rows']:,}: "
              f"~{extrapolated['peak_rss_growth_bytes'] / 1e9:.1f} GB, ~{extrapolated['wall_s']:.0f} s")

    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine(),
              "load_avg_1min_at_start": load_start, "load_avg_1min_at_end": os.getloadavg()[0],
              "python": platform.python_version(), "pyarrow": pa.__version__, "numpy": np.__version__,
              "rows": args.rows, "done_rows": args.rows // 2, "chunk_rows": args.chunk_rows, "runs": results,
              "old_extrapolated": extrapolated if old["rows"] != args.rows else None}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

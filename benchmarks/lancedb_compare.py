"""LanceDB against our index (issue 23): the same synthetic rows, queries, filters and exact ground truth as
`benchmarks.search`, through a LanceDB table with an IVF_PQ index: build time and peak RSS, latency
(median and p95 of single queries, one at a time, over --runs passes) and recall@10 against exact search,
with and without filters inside the search (prefilter), and an append of new rows (the time, whether the
index covers them, what `optimize` costs, latency and recall before and after it).

Rows and queries come from `benchmarks.search`'s generators (`synthetic_blocks`, `synthetic_queries`),
the label score and URI of each row from `benchmarks.synthetic_index` (`_synthetic_batch`), and the filters
are `benchmarks.search.FILTERS` written as LanceDB SQL. Vectors are stored as float32 (`--dtype float16`, as
our index stores them, made LanceDB's IVF_PQ build ~10x slower at 10k rows), and the exact top-10 is computed
with numpy over the stored values; our benchmark's truth is the product's exact search over float16, so the
truth's agreement with a float16 one is recorded (`truth_agreement_with_float16`; at 10k rows both equal
the product's exact search). Each step runs in a fresh process, so each peak RSS (VmHWM) is its own.
LanceDB is a benchmark-only tool, not a dependency: `pip install lancedb pylance` (versions in the JSON).

Usage: python -m benchmarks.lancedb_compare --n 1000000 --latent 0 [--queries 200] [--data /work/bench-data]
       [--index 1024:64 1024:128] [--nprobes 20 64 128] [--refine 10 50] [--runs 3] [--append 100000]
       [--threads N] [--keep] [--reuse] [--out benchmarks/results/lancedb-1m.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks.search import FILTERS, QUERY_KINDS, _in_child, _peak, synthetic_blocks, synthetic_queries
from benchmarks.synthetic_index import _synthetic_batch

log = logging.getLogger("benchmarks.lancedb_compare")

DIM, K, FILTERED_QUERIES = 512, 10, 50  # benchmarks.search: 50 queries per filter
# benchmarks.search.FILTERS as LanceDB SQL over this table's columns (score: the one label's score)
SQL = {"label >= 0.9 (10%)": "score >= 0.9", "uri prefix (11%)": "uri LIKE 'synthetic://1%'",
       "label >= 0.99 (1%)": "score >= 0.99"}
assert {f["min_score"] for f in FILTERS.values() if "min_score" in f} == {0.9, 0.99} and set(SQL) == set(FILTERS)


def _columns(start: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(label score, uri) of rows start..start+m-1, as the product's synthetic index writes them."""
    batch = _synthetic_batch(start, m)
    return batch.column("scores").values.to_numpy(zero_copy_only=False), batch.column("uri").to_numpy(zero_copy_only=False)


def _mask(sql: str, score: np.ndarray, uri: np.ndarray) -> np.ndarray:
    if sql.startswith("score >= "):
        return score >= float(sql.split()[-1])
    return np.char.startswith(uri.astype(str), "synthetic://1")


DTYPE = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}


def _schema(dtype: str) -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("vector", pa.list_(DTYPE[dtype][1], DIM)), ("score", pa.float32()),
                      ("uri", pa.string())])


def _batches(n: int, latent: int, dtype: str, first: int = 0):
    start = first
    for block in synthetic_blocks(n, latent=latent, first=first):
        score, uri = _columns(start, len(block))
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(block.astype(DTYPE[dtype][0]).ravel()), DIM)
        yield pa.RecordBatch.from_pydict({"id": pa.array(np.arange(start, start + len(block))),
                                          "vector": vectors, "score": pa.array(score), "uri": pa.array(uri)})
        start += len(block)


def _dir_gb(path: str) -> float:
    return round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**30, 3)


def _write(path: str, n: int, latent: int, dtype: str) -> dict:
    import lancedb

    started = time.time()
    db = lancedb.connect(path)
    db.create_table("rows", data=pa.RecordBatchReader.from_batches(_schema(dtype), _batches(n, latent, dtype)), mode="overwrite")
    return {"write_s": round(time.time() - started, 1), "write_memory_gb": _peak(), "table_gb": _dir_gb(path)}


def _truth(n: int, extra: int, latent: int, queries: dict[str, np.ndarray], dtype: str) -> dict:
    """Exact top-K ids per query kind and filter, over rows 0..n-1 and (extra) 0..n+extra-1, by inner
    product over the stored vectors (all rows are unit vectors: cosine); and, unfiltered over rows
    0..n-1, the fraction of those ids that exact search over the float16 vectors also returns."""
    sizes = [n] + ([n + extra] if extra else [])
    best = {(kind, name): (np.full((len(q) if name == "none" else FILTERED_QUERIES, K), -np.inf, np.float32),
                           np.zeros((len(q) if name == "none" else FILTERED_QUERIES, K), np.int64))
            for kind, q in queries.items() for name in ["none", *SQL]}
    out = {}
    start = 0
    blocks = (block for i, size in enumerate(sizes) for block in synthetic_blocks(size, latent=latent, first=[0, *sizes][i]))
    half = {kind: best[kind, "none"] for kind in queries}
    for block in blocks:
        score, uri = _columns(start, len(block))
        for kind, q in queries.items():
            if start < n:
                s = q @ block.astype(np.float16).astype(np.float32).T
                top = np.argpartition(-s, K - 1, axis=1)[:, :K]
                scores = np.concatenate([half[kind][0], np.take_along_axis(s, top, 1)], 1)
                ids = np.concatenate([half[kind][1], top + start], 1)
                keep = np.argsort(-scores, axis=1, kind="stable")[:, :K]
                half[kind] = (np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1))
            sims = q @ block.astype(DTYPE[dtype][0]).astype(np.float32).T
            for name in ["none", *SQL]:
                s = sims if name == "none" else np.where(_mask(SQL[name], score, uri)[None, :], sims[:FILTERED_QUERIES], -np.inf)
                top = np.argpartition(-s, K - 1, axis=1)[:, :K]
                scores = np.concatenate([best[kind, name][0], np.take_along_axis(s, top, 1)], 1)
                ids = np.concatenate([best[kind, name][1], top + start], 1)
                keep = np.argsort(-scores, axis=1, kind="stable")[:, :K]
                best[kind, name] = (np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1))
        start += len(block)
        if start in sizes:
            out[start] = {kind: {name: best[kind, name][1].tolist() for name in ["none", *SQL]} for kind in queries}
    agreement = {kind: float(np.mean([len(set(a) & set(b)) / K for a, b in zip(half[kind][1].tolist(), out[n][kind]["none"])]))
                 for kind in queries}
    return {"truth": out, "truth_memory_gb": _peak(), "truth_agreement_with_float16": agreement}


def _index(path: str, partitions: int, sub_vectors: int, metric: str, scalar: bool) -> dict:
    import lancedb
    from lancedb.index import IvfPq

    table = lancedb.connect(path).open_table("rows")
    started = time.time()
    table.create_index("vector", replace=True, config=IvfPq(
        distance_type=metric, num_partitions=partitions, num_sub_vectors=sub_vectors, num_bits=8))
    built = {"index_s": round(time.time() - started, 1)}
    if scalar:
        started = time.time()
        table.create_scalar_index("score", index_type="BTREE", replace=True)
        built["score_btree_s"] = round(time.time() - started, 1)
    return {**built, "index_memory_gb": _peak(), "table_gb": _dir_gb(path),
            "indices": [str(i) for i in table.list_indices()]}


def _query(table, q, nprobes: int, refine: int, metric: str, where: str | None):
    query = table.search(q, vector_column_name="vector").distance_type(metric).limit(K).nprobes(nprobes)
    if refine:
        query = query.refine_factor(refine)
    if where:
        query = query.where(where, prefilter=True)
    return query.select(["id"]).to_arrow().column("id").to_numpy()


def _search(path: str, queries: dict[str, np.ndarray], truth: dict, settings: list[tuple[int, int]],
            metric: str, runs: int, filters: list[str]) -> dict:
    """Latency over `runs` passes (each query once per pass, one at a time) and recall@K, per setting,
    query kind and filter."""
    import lancedb

    started = time.perf_counter()
    table = lancedb.connect(path).open_table("rows")
    for q in queries["rows"][:5]:  # open the index files
        _query(table, q, settings[0][0], settings[0][1], metric, None)
    load_s = time.perf_counter() - started
    rows = []
    for nprobes, refine in settings:
        for kind, qs in queries.items():
            for name in ["none", *filters]:
                want = truth[kind][name]
                where = None if name == "none" else SQL[name]
                _query(table, qs[0], nprobes, refine, metric, where)  # a filter's first query
                run_ms, recall, short = [], [], 0
                for _ in range(runs):
                    ms = []
                    for q, expected in zip(qs[:len(want)], want):
                        t = time.perf_counter()
                        hits = _query(table, q, nprobes, refine, metric, where)
                        ms.append((time.perf_counter() - t) * 1000)
                        if len(recall) < len(want):
                            recall.append(len(set(expected) & set(hits.tolist())) / K)
                            short += len(hits) < K
                    run_ms.append(ms)
                medians = [float(np.median(m)) for m in run_ms]
                rows.append({"nprobes": nprobes, "refine_factor": refine, "queries_kind": kind, "filter": name,
                             "queries": len(want), "runs": runs,
                             "ms_median": round(float(np.median(medians)), 3),
                             "ms_median_range": [round(min(medians), 3), round(max(medians), 3)],
                             "ms_p95": round(float(np.median([np.percentile(m, 95) for m in run_ms])), 3),
                             "recall_at_10": round(float(np.mean(recall)), 4), "short_results": short})
                log.info("%s", rows[-1])
    return {"rows": rows, "load_s": round(load_s, 2), "search_memory_gb": _peak()}


def _append(path: str, n: int, added: int, latent: int, dtype: str) -> dict:
    """Append rows n..n+added-1 (`Table.add`), then `optimize` (compaction and the index extended to the
    new rows, no retraining); the index's unindexed rows after each."""
    import lancedb

    table = lancedb.connect(path).open_table("rows")
    name = next(i.name for i in table.list_indices() if i.columns == ["vector"])
    started = time.time()
    table.add(pa.RecordBatchReader.from_batches(_schema(dtype), _batches(n + added, latent, dtype, first=n)))
    out = {"append_rows": added, "append_s": round(time.time() - started, 1),
           "unindexed_after_append": table.index_stats(name).num_unindexed_rows}
    return {**out, "append_memory_gb": _peak()}


def _optimize(path: str) -> dict:
    import lancedb

    table = lancedb.connect(path).open_table("rows")
    name = next(i.name for i in table.list_indices() if i.columns == ["vector"])
    started = time.time()
    table.optimize()
    stats = table.index_stats(name)
    return {"optimize_s": round(time.time() - started, 1), "unindexed_after_optimize": stats.num_unindexed_rows,
            "index_stats_after_optimize": str(stats), "optimize_memory_gb": _peak(), "table_gb": _dir_gb(path)}


def _found_self(path: str, n: int, added: int, latent: int, metric: str, nprobes: int, refine: int) -> str:
    import lancedb

    table = lancedb.connect(path).open_table("rows")
    vectors = np.concatenate(list(synthetic_blocks(n + added, latent=latent, first=n)))
    probe = np.linspace(0, added - 1, 20).astype(int)
    found = sum(int(_query(table, vectors[i], nprobes, refine, metric, None)[0]) == n + i for i in probe)
    return f"{found}/{len(probe)}"


def measure(args) -> dict:
    path = os.path.join(args.data, f"lancedb-{args.n}-{args.latent}") if args.data else tempfile.mkdtemp(prefix="lancedb-bench-")
    queries = {kind: synthetic_queries(args.queries, latent=args.latent, kind=kind) for kind in args.query_kinds}
    settings = [(p, r) for p in args.nprobes for r in args.refine]
    result = {"n": args.n, "dim": DIM, "latent": args.latent, "queries": args.queries, "metric": args.metric,
              "vector_dtype": args.dtype, "filters": {f: SQL[f] for f in args.filters}, "prefilter": True}
    try:
        if not (args.reuse and os.path.exists(os.path.join(path, "rows.lance"))):
            shutil.rmtree(path, ignore_errors=True)
            result["write"] = _in_child(_write, path, args.n, args.latent, args.dtype)
            log.info("wrote %s", result["write"])
        truth = _in_child(_truth, args.n, args.append, args.latent, queries, args.dtype)
        result["truth_memory_gb"] = truth["truth_memory_gb"]
        result["truth_agreement_with_float16"] = truth["truth_agreement_with_float16"]
        truth = {int(k): v for k, v in truth["truth"].items()}
        result["indexes"] = []
        for spec in args.index:
            partitions, sub_vectors = (int(x) for x in spec.split(":"))
            entry = {"num_partitions": partitions, "num_sub_vectors": sub_vectors, "num_bits": 8,
                     "bytes_per_code": sub_vectors}
            entry.update(_in_child(_index, path, partitions, sub_vectors, args.metric, bool(args.filters)))
            log.info("index %s", {k: v for k, v in entry.items()})
            entry.update(_in_child(_search, path, queries, truth[args.n], settings, args.metric, args.runs, args.filters))
            result["indexes"].append(entry)
        if args.append:
            after = settings if args.append_all_settings else [settings[-1]]
            appended = _in_child(_append, path, args.n, args.append, args.latent, args.dtype)
            appended["before_optimize"] = _in_child(_search, path, queries, truth[args.n + args.append], after,
                                                    args.metric, args.runs, [])
            appended.update(_in_child(_optimize, path))
            appended["after_optimize"] = _in_child(_search, path, queries, truth[args.n + args.append], after,
                                                   args.metric, args.runs, [])
            appended["found_self"] = _in_child(_found_self, path, args.n, args.append, args.latent, args.metric, *after[0])
            appended["index"] = args.index[-1]
            result["append"] = appended
        return result
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)


def _table(result: dict) -> str:
    lines = ["| index (partitions:sub-vectors) | build s | nprobes | refine | queries | filter | ms median [range of runs] | p95 ms | recall@10 |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|"]
    for entry in result["indexes"]:
        for row in entry["rows"]:
            lines.append(f"| {entry['num_partitions']}:{entry['num_sub_vectors']} | {entry['index_s']} | {row['nprobes']} | "
                         f"{row['refine_factor'] or '-'} | {row['queries_kind']} | {row['filter']} | {row['ms_median']} "
                         f"[{row['ms_median_range'][0]}, {row['ms_median_range'][1]}] | {row['ms_p95']} | {row['recall_at_10']} |")
    for stage in ("before_optimize", "after_optimize"):
        for row in result.get("append", {}).get(stage, {}).get("rows", []):
            lines.append(f"| {result['append']['index']} + {result['append']['append_rows']:,} appended, {stage.replace('_', ' ')} "
                         f"| - | {row['nprobes']} | {row['refine_factor'] or '-'} | {row['queries_kind']} | {row['filter']} | "
                         f"{row['ms_median']} [{row['ms_median_range'][0]}, {row['ms_median_range'][1]}] | {row['ms_p95']} | {row['recall_at_10']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--latent", type=int, default=0, help="as benchmarks.search (0: power-law rows, issue 23's set)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--query-kinds", nargs="+", default=list(QUERY_KINDS), choices=QUERY_KINDS)
    p.add_argument("--index", nargs="+", default=["1024:64", "1024:128"], help="IVF_PQ num_partitions:num_sub_vectors (8-bit codes)")
    p.add_argument("--nprobes", type=int, nargs="+", default=[20, 64, 128])
    p.add_argument("--refine", type=int, nargs="+", default=[10, 50], help="refine_factor (0: none)")
    p.add_argument("--metric", default="dot", choices=["dot", "cosine"], help="unit vectors: both are cosine")
    p.add_argument("--dtype", default="float32", choices=list(DTYPE), help="stored vectors")
    p.add_argument("--filters", nargs="*", default=list(SQL), choices=list(SQL))
    p.add_argument("--runs", type=int, default=3, help="latency passes over the queries")
    p.add_argument("--append", type=int, default=0, help="then append this many rows (last index)")
    p.add_argument("--append-all-settings", action="store_true", help="measure every setting after the append (default: the last)")
    p.add_argument("--threads", type=int, help="LANCE_CPU_THREADS (default: LanceDB's, one per core)")
    p.add_argument("--data", help="directory for the table (default: a temporary directory)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--reuse", action="store_true", help="reuse a table already written under --data (indexes are rebuilt)")
    p.add_argument("--out", default="benchmarks/results/lancedb-1m.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        os.environ["LANCE_CPU_THREADS"] = str(args.threads)
    import lance
    import lancedb

    started = time.time()
    result = measure(args)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_at_end": load,
              "lancedb": lancedb.__version__, "pylance": lance.__version__,
              "lance_cpu_threads": args.threads or f"default ({os.cpu_count()})", "total_s": round(time.time() - started),
              "argv": argv if argv is not None else __import__("sys").argv[1:], **result}
    print(_table(result))
    if "append" in result:
        a = result["append"]
        print(f"append {a['append_rows']:,} rows: {a['append_s']} s, {a['unindexed_after_append']} rows unindexed; "
              f"optimize {a['optimize_s']} s, {a['unindexed_after_optimize']} unindexed; found self {a['found_self']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

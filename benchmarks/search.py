"""Search at scale: build time and memory, latency and recall@10 of the ANN (IVF-PQ + exact re-ranking)
against exact search, with and without filters, and the time to append rows, through the product's own
index files and Searcher on a synthetic index.

Synthetic vectors: 48 latent dimensions mapped to 512 plus isotropic noise, L2-normalised (embeddings
of real collections have low intrinsic dimension; uniform random vectors would make any ANN look bad).
They are generated and written in blocks, so N can exceed memory. Build, exact ground truth, ANN search
and the update each run in a fresh process, so each peak RSS (VmHWM) is its own.

Queries come from the rows' distribution, or (`--query-kind shifted`) from another one, our model of the
text-audio modality gap (`synthetic_queries`); both kinds can be measured on one index. With
`--calibrate`, the build calibrates the index as `jobs.index` does, with 200 shifted queries of another
draw standing in for the label prompts (held out from the measured queries), and the measured settings
default to the calibrated ones.

Usage: python -m benchmarks.search --n 1000000 [--queries 200] [--nprobe 128 256] [--rerank 10 30]
       [--query-kind rows shifted] [--calibrate] [--no-query-axis] [--data /work/bench-data] [--keep]
       [--reuse] [--update 100000] [--out benchmarks/results/search.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.synthetic_index import append_synthetic_index, write_synthetic_index
from pipeline.retrieval.ann import AnnConfig

FILTERS = {"label >= 0.9 (10%)": {"label": "synthetic", "min_score": 0.9},
           "uri prefix (11%)": {"uri_prefix": "synthetic://1"},
           "label >= 0.99 (1%)": {"label": "synthetic", "min_score": 0.99}}


def _mixing(seed: int, dim: int, latent: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((latent, dim)).astype(np.float32)


def _power_law(rng, count: int, dim: int, basis_seed: int) -> np.ndarray:
    """Gaussian rows with a power-law spectrum (variance i^-1 along the i-th direction of a random basis)."""
    basis, _ = np.linalg.qr(np.random.default_rng([basis_seed, 11]).standard_normal((dim, dim)))
    spectrum = 1.0 / np.arange(1, dim + 1)
    return ((rng.standard_normal((count, dim)) * np.sqrt(spectrum / spectrum.sum())) @ basis.T).astype(np.float32)


def synthetic_blocks(n: int, dim: int = 512, latent: int = 48, seed: int = 0, block: int = 100_000, first: int = 0):
    """Rows first..n-1 of the synthetic set, in blocks (row i is the same whatever `first` and `block`):
    `latent` dimensions mapped to `dim` plus isotropic noise, or (latent 0) a power-law spectrum over all
    `dim` directions (no low-dimensional shortcut)."""
    mixing = _mixing(seed, dim, latent) if latent else None
    for start in range(first - first % block, n, block):
        rng = np.random.default_rng([seed, start])
        m = min(block, n - start)
        if latent:
            rows = rng.standard_normal((m, latent), dtype=np.float32) @ mixing
            rows += 0.5 * rng.standard_normal((m, dim), dtype=np.float32)
        else:
            rows = _power_law(rng, m, dim, seed)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        yield rows[max(0, first - start):]


QUERY_KINDS = ("rows", "shifted")


def synthetic_queries(count: int, dim: int = 512, latent: int = 48, seed: int = 0, kind: str = "rows",
                      draw: int = 0) -> np.ndarray:
    """Queries from the rows' distribution ("rows": the latent part only), or from another one ("shifted"),
    our model of CLAP's modality gap between text and audio: the same latent part (what a query and its
    matches share), plus a common offset (the text cone: a fixed unit direction carrying half of each
    query's norm, so matched pairs' cosines sit far below 1) and noise with a power-law spectrum (i^-1 over
    the 512 directions of a random basis) instead of the rows' isotropic noise. Another `draw` gives other
    queries of the same distribution (the same gap)."""
    rng = np.random.default_rng([seed, -1 % 2**32] + ([draw] if draw else []))
    if latent:
        queries = rng.standard_normal((count, latent)).astype(np.float32) @ _mixing(seed, dim, latent)
    else:
        queries = _power_law(rng, count, dim, seed)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    if kind == "shifted":
        gap = np.random.default_rng([seed, 7])
        offset = gap.standard_normal(dim).astype(np.float32)
        basis, _ = np.linalg.qr(gap.standard_normal((dim, dim)))
        spectrum = 1.0 / np.arange(1, dim + 1)
        noise = (rng.standard_normal((count, dim)) * np.sqrt(spectrum / spectrum.sum())) @ basis.T  # other basis
        queries = queries + 0.6 * noise.astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        queries += offset / np.linalg.norm(offset)
    elif kind != "rows":
        raise ValueError(f"query kind must be one of {QUERY_KINDS}")
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def synthetic(n: int, dim: int = 512, latent: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n vectors, 400 queries) in memory, for tests."""
    return np.concatenate(list(synthetic_blocks(n, dim, latent, seed))), synthetic_queries(400, dim, latent, seed)


def _peak() -> dict:
    """This process's peak and current resident memory (GB), from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = round(int(value.split()[0]) / 2**20, 2)
    return fields


THREADS = {"faiss": None}


def _call(fn, threads, args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if threads:
        import faiss

        faiss.omp_set_num_threads(threads)
    return fn(*args)


def _in_child(fn, *args):
    """Run fn(*args) in a fresh process (with the faiss thread count asked for); its return value."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_call, (fn, THREADS["faiss"], args))


CALIBRATION_QUERIES = 200


def _build(out: str, n: int, ann: AnnConfig, latent: int = 48, calibrate: bool = False) -> dict:
    """Write the index; with `calibrate`, calibrated (and its query axis trained) on shifted queries of
    another draw than the measured ones."""
    from pipeline.retrieval.calibrate import CalibrationConfig

    started = time.time()
    queries = synthetic_queries(CALIBRATION_QUERIES, latent=latent, kind="shifted", draw=1) if calibrate else None
    info = write_synthetic_index(out, synthetic_blocks(n, latent=latent), ann,
                                 CalibrationConfig() if calibrate else None, queries=queries)
    calibration = info["tables"]["segments"].get("calibration")
    return {"build_s": round(time.time() - started, 1), "build_stages_s": info["build_stages_s"],
            "build_memory_gb": _peak(), "query_axis": info["tables"]["segments"]["query_axis"],
            **({"calibration": calibration} if calibration else {})}


def _truth(out: str, queries: np.ndarray, k: int, single: int, filters: list[str] | None = None) -> dict:
    """Exact top-k per query (the product's exact path, all queries in one pass per shard), per filter,
    and the latency of single exact queries."""
    from pipeline.retrieval.search import Filters, Searcher

    searcher = Searcher(out, exact=True)
    table = searcher.tables["segments"]
    out_rows = {}
    for name, spec in _filters(filters).items():
        mask = table.mask(Filters(**spec), searcher.labels)
        qs = queries if name == "none" else queries[:50]
        out_rows[name] = searcher._search(table, qs, mask, k)[1].tolist()
    times = []
    for q in queries[:single]:
        started = time.perf_counter()
        searcher.vector(q, k, segments=True)
        times.append((time.perf_counter() - started) * 1000)
    return {"truth": out_rows, "exact_ms": times, "exact_memory_gb": _peak()}


def _filters(names: list[str] | None) -> dict:
    return {"none": {}, **{n: f for n, f in FILTERS.items() if names is None or n in names}}


def _search(out: str, queries: np.ndarray, truth: dict, k: int, settings: list[tuple[int | None, int | None]],
            filter_exponent: float = AnnConfig.filter_probe_exponent) -> dict:
    """Latency and recall@k of the ANN path, per (nprobe, rerank) (None: the Searcher's default, the
    calibrated setting if the index has one), unfiltered and filtered."""
    from pipeline.retrieval.search import Filters, Searcher

    started = time.perf_counter()
    searcher = Searcher(out)
    searcher.warm()
    load_s = time.perf_counter() - started
    table = searcher.tables["segments"]
    defaults = table.nprobe, table.rerank
    rows = []
    for nprobe, rerank in settings:
        table.nprobe, table.rerank = nprobe or defaults[0], rerank or defaults[1]
        table.filter_exponent = filter_exponent
        for name, spec in _filters(list(truth)).items():
            filters = Filters(**spec)
            want = truth[name]
            qs = queries[:len(want)]
            table.mask(filters, searcher.labels)  # masks are cached per filter: time the search, not the first mask
            ms, recall = [], []
            for q, expected in zip(qs, want):
                t = time.perf_counter()
                hits = searcher._top(table, q, table.mask(filters, searcher.labels), k)[0]
                ms.append((time.perf_counter() - t) * 1000)
                recall.append(len(set(expected) & set(hits.tolist())) / k)
                assert len(hits) == k
            rows.append({"nprobe": table.nprobe, "nlist": table.nlist, "rerank": table.rerank, "filter": name,
                         "filter_probe_exponent": filter_exponent, "queries": len(qs),
                         "ann_ms_median": round(float(np.median(ms)), 3),
                         "ann_ms_p95": round(float(np.percentile(ms, 95)), 3),
                         "recall_at_10": round(float(np.mean(recall)), 4)})
            logging.getLogger("benchmarks.search").info("%s", rows[-1])
    mask_ms = []
    for i in range(5):  # the first query with a new filter builds its mask (uri prefix: a scan of every uri)
        filters = Filters(uri_prefix=f"synthetic://{i + 2}")
        t = time.perf_counter()
        table.mask(filters, searcher.labels)
        mask_ms.append((time.perf_counter() - t) * 1000)
    hits = searcher.vector(queries[0], k)
    return {"rows": rows, "indexed_rows": int(table.ann.ntotal), "load_s": round(load_s, 2), "new_uri_filter_mask_ms": round(float(np.median(mask_ms)), 1),
            "clip_level_hits": len(hits), "search_memory_gb": _peak()}


def _update(out: str, n: int, added: int, ann: AnnConfig, latent: int = 48) -> dict:
    from pipeline.retrieval.search import Searcher

    vectors = np.concatenate(list(synthetic_blocks(n + added, latent=latent, first=n, seed=0)))
    started = time.time()
    append_synthetic_index(out, vectors, ann)
    update_s = time.time() - started
    searcher = Searcher(out)
    probe = np.linspace(0, added - 1, 20).astype(int)
    found = sum(searcher.vector(vectors[i], 1, segments=True)[0].uri == f"synthetic://{n + i}" for i in probe)
    return {"update_rows": added, "update_s": round(update_s, 1), "update_found_self": f"{found}/{len(probe)}",
            "update_memory_gb": _peak()}


def measure(n: int, queries: int, ann: AnnConfig, settings: list[tuple[int | None, int | None]], data: str | None,
            keep: bool, reuse: bool, update: int, filters: list[str] | None = None,
            filter_exponent: float = AnnConfig.filter_probe_exponent, query_kinds: tuple[str, ...] = ("rows",),
            latent: int = 48, calibrate: bool = False) -> dict:
    """One index of n rows: built (or reused), then per query kind exact truth and the ANN's rows."""
    out = os.path.join(data, f"search-{n}-{latent}") if data else tempfile.mkdtemp(prefix="search-bench-")
    try:
        built = {}
        if not (reuse and os.path.exists(os.path.join(out, "_index", "index.json"))):
            shutil.rmtree(out, ignore_errors=True)
            built = _in_child(_build, out, n, ann, latent, calibrate)
        rows, exact, searched = [], [], {}
        for kind in query_kinds:
            qs = synthetic_queries(queries, latent=latent, kind=kind)
            truth = _in_child(_truth, out, qs, 10, 5, filters)
            searched = _in_child(_search, out, qs, truth["truth"], 10, settings, filter_exponent)
            rows += [{"query_kind": kind, **row} for row in searched.pop("rows")]
            exact += truth["exact_ms"]
        size = sum(f.stat().st_size for f in Path(out, "_index").iterdir())
        updated = _in_child(_update, out, n, update, ann, latent) if update else {}
        return {"n": n, "dim": 512, "latent": latent, "queries": queries, "query_kinds": list(query_kinds), **built,
                "index_gb": round(size / 2**30, 2), "exact_ms_median": round(float(np.median(exact)), 1),
                "exact_queries": len(exact), "exact_memory_gb": truth["exact_memory_gb"], "rows": rows, **searched,
                **updated, "ann": asdict(ann)}
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--nprobe", type=int, nargs="+", default=[None],
                   help="default: the calibrated setting, else AnnConfig.probe_fraction of the lists")
    p.add_argument("--rerank", type=int, nargs="+", default=[None],
                   help=f"default: the calibrated setting, else {AnnConfig.rerank}")
    p.add_argument("--nlist", type=int, help="IVF lists (default: AnnConfig's rule)")
    p.add_argument("--project-dim", type=int, default=AnnConfig.project_dim, help="IVF-PQ dimensions (0: all)")
    p.add_argument("--data", help="directory for the index files (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the index files under --data")
    p.add_argument("--reuse", action="store_true", help="reuse an index already under --data")
    p.add_argument("--update", type=int, default=0, help="then append this many rows and time it")
    p.add_argument("--filters", nargs="*", choices=list(FILTERS), help="filters to measure (default: all)")
    p.add_argument("--filter-exponent", type=float, default=AnnConfig.filter_probe_exponent,
                   help="a filter keeping a fraction f of rows scans f ** -this times the lists")
    p.add_argument("--threads", type=int, help="faiss OpenMP threads (default: one per core)")
    p.add_argument("--latent", type=int, default=48,
                   help="rows: this many latent dimensions plus noise; 0: a power-law spectrum over all 512")
    p.add_argument("--query-kind", nargs="+", default=["rows"], choices=QUERY_KINDS,
                   help="queries from the rows' distribution, or shifted (a modeled text-audio modality gap)")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrate the index at build on 200 held-out shifted queries, as jobs.index does with text")
    p.add_argument("--no-query-axis", action="store_true",
                   help="train the ANN without the calibration queries' axis (AnnConfig.query_axis)")
    p.add_argument("--out", default="benchmarks/results/search.json")
    args = p.parse_args(argv)
    THREADS["faiss"] = args.threads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ann = AnnConfig(nlist=args.nlist, project_dim=args.project_dim, query_axis=not args.no_query_axis)
    settings = [(a, b) for a in args.nprobe for b in args.rerank]
    results = [measure(n, args.queries, ann, settings, args.data, args.keep, args.reuse, args.update,
                       args.filters, args.filter_exponent, tuple(args.query_kind), args.latent, args.calibrate)
               for n in args.n]
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_at_end": load,
              "faiss_threads": args.threads or os.cpu_count(),
              "results": results}
    print(f"{'N':>10} {'build s':>8} {'exact ms':>9} {'queries':>8} {'nprobe':>7} {'rerank':>7} {'filter':>20} "
          f"{'ANN ms':>8} {'p95 ms':>8} {'recall@10':>10}")
    for r in results:
        for row in r["rows"]:
            print(f"{r['n']:>10} {r.get('build_s', '-'):>8} {r['exact_ms_median']:>9} {row['query_kind']:>8} "
                  f"{row['nprobe']:>7} {row['rerank']:>7} {row['filter']:>20} {row['ann_ms_median']:>8} "
                  f"{row['ann_ms_p95']:>8} {row['recall_at_10']:>10}")
        if "calibration" in r:
            c = r["calibration"]
            print(f"{r['n']:>10} calibrated on {c['queries']} held-out shifted queries in "
                  f"{r['build_stages_s'].get('calibrate_s')} s: nprobe {c['nprobe']}, rerank {c['rerank']}, "
                  f"recall@10 {c['recall']:.3f}")
        print(f"{r['n']:>10} search RSS peak {r['search_memory_gb']['VmHWM']} GB, index {r['index_gb']} GB on disk, "
              f"update {r.get('update_rows', 0)} rows {r.get('update_s', '-')} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

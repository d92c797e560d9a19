"""Search latency and recall: exact (numpy matmul over memory-mapped vectors) and ANN (FAISS HNSW),
top-10, at N vectors of 512 dims, through the product's own Searcher on a synthetic index.

Synthetic vectors: 48 latent dimensions mapped to 512 plus isotropic noise, L2-normalised (embeddings
of real collections have low intrinsic dimension; uniform random vectors would make any ANN look bad).
Usage: python -m benchmarks.search --n 100000 1000000 [--queries 200] [--out results/search.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.index import AnnConfig, write_synthetic_index
from pipeline.search import Searcher


def synthetic(n: int, dim: int = 512, latent: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((latent, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        block = rng.standard_normal((m, latent)).astype(np.float32) @ mixing
        block += 0.5 * rng.standard_normal((m, dim)).astype(np.float32)
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    queries = rng.standard_normal((400, latent)).astype(np.float32) @ mixing
    return out, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def measure(n: int, queries: int, ann: AnnConfig, ef_values: list[int]) -> list[dict]:
    vectors, qs = synthetic(n)
    qs = qs[:queries]
    with tempfile.TemporaryDirectory() as out:
        started = time.time()
        write_synthetic_index(out, vectors, ann)
        build_s = time.time() - started
        del vectors
        exact = Searcher(out, exact=True)
        truth, exact_ms = [], []
        for q in qs:
            t = time.perf_counter()
            hits = exact.vector(q, 10, segments=True)
            exact_ms.append((time.perf_counter() - t) * 1000)
            truth.append({h.clip_id for h in hits})
        del exact
        rows = []
        approx = Searcher(out)
        for ef in ef_values:
            approx.tables["segments"].ef_search = ef
            ann_ms, recall = [], []
            for q, want in zip(qs, truth):
                t = time.perf_counter()
                hits = approx.vector(q, 10, segments=True)
                ann_ms.append((time.perf_counter() - t) * 1000)
                recall.append(len(want & {h.clip_id for h in hits}) / 10)
            rows.append({"n": n, "dim": 512, "queries": queries, "build_s": round(build_s, 1),
                         "exact_ms_median": round(float(np.median(exact_ms)), 2),
                         "exact_ms_p95": round(float(np.percentile(exact_ms, 95)), 2),
                         "ef_search": ef, "ann_ms_median": round(float(np.median(ann_ms)), 3),
                         "ann_ms_p95": round(float(np.percentile(ann_ms, 95)), 3),
                         "recall_at_10": round(float(np.mean(recall)), 4), "ann": ann.__dict__})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, nargs="+", default=[100_000])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--ef-search", type=int, nargs="+", default=[128, 256, 320, 512])
    p.add_argument("--out", default="benchmarks/results/search.json")
    args = p.parse_args(argv)
    rows = [row for n in args.n for row in measure(n, args.queries, AnnConfig(), args.ef_search)]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
              "rows": rows}
    print(f"{'N':>9} {'build s':>8} {'exact ms':>9} {'efSearch':>9} {'ANN ms':>8} {'recall@10':>10}")
    for r in rows:
        print(f"{r['n']:>9} {r['build_s']:>8} {r['exact_ms_median']:>9} {r['ef_search']:>9} "
              f"{r['ann_ms_median']:>8} {r['recall_at_10']:>10}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The index calibrates its ANN for text queries (issue 23): label prompts through the tiny CLAP text tower,
searched against exact search over a synthetic index of the tiny CLAP's width; the recorded recall and
depth are checked against an independent brute force, the Searcher and jobs.search take them up, an update
keeps or measures again, an index too small for an ANN records that none is needed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, ClapModel

from benchmarks.synthetic_index import append_synthetic_index, write_synthetic_index
from jobs import search as search_job
from pipeline.checkpoints import label_names
from pipeline.retrieval.ann import AnnConfig
from pipeline.retrieval.calibrate import CalibrationConfig
from pipeline.retrieval.files import IndexFiles
from pipeline.retrieval.search import Searcher
from pipeline.tagging.job import TagJobConfig

ROWS, DIM = 20_000, 16  # the tiny CLAP embeds in 16 dimensions
ANN = AnnConfig(pq_m=8, min_rows=1_000)  # PQ8x4 over 16-d: coarse, so recall grows with the re-rank depth
CONFIG = CalibrationConfig(reranks=(2, 4, 8, 16, 32, 64), probe_factors=(1.0,))  # one probe count: depths rank


def _rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, checkpoints):
    out = tmp_path_factory.mktemp("calibrated")
    vectors = _rows(ROWS, 0)
    write_synthetic_index(str(out), vectors, ANN, CONFIG, clap=checkpoints["clap"],
                          labels=label_names(checkpoints["ast"]))
    return out, vectors


def _queries(checkpoints) -> np.ndarray:
    """The AST checkpoint's labels as the job's zero-shot prompts, through HF's ClapModel (not our encoder)."""
    texts = [TagJobConfig.zero_shot_prompt.format(label=x) for x in label_names(checkpoints["ast"])]
    model = ClapModel.from_pretrained(checkpoints["clap"]).eval()
    tok = AutoTokenizer.from_pretrained(checkpoints["clap"])
    with torch.inference_mode():
        return model.get_text_features(**tok(texts, padding=True, return_tensors="pt")).pooler_output.numpy()


def _recall(searcher: Searcher, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean recall@k of the searcher's hits against a brute-force inner product over the stored (fp16) rows."""
    stored = vectors.astype(np.float16).astype(np.float32)
    hits = 0
    for q in queries:
        truth = set(np.argsort(-(stored @ q), kind="stable")[:k].tolist())
        hits += len(truth & {int(h.uri.rsplit("/", 1)[1]) for h in searcher.vector(q, k, segments=True)})
    return hits / (k * len(queries))


def test_index_json_records_the_calibration(calibrated, checkpoints):
    out, _ = calibrated
    info = IndexFiles(str(out)).info()
    for table in ("clips", "segments"):
        c = info["tables"][table]["calibration"]
        assert c["needed"] and c["reached"] and c["target_recall"] == 0.95 and c["k"] == 10
        assert c["queries"] == len(label_names(checkpoints["ast"])) and c["rows"] == ROWS
        assert c["rerank"] in CONFIG.reranks and 1 <= c["nprobe"] <= c["nlist"]


def test_recorded_recall_and_depth_hold_against_brute_force(calibrated, checkpoints):
    """The recorded recall is what the Searcher's defaults give against exact search for the same queries,
    and the chosen depth is the smallest candidate reaching the target: the next smaller one does not."""
    out, vectors = calibrated
    c = IndexFiles(str(out)).info()["tables"]["segments"]["calibration"]
    queries = _queries(checkpoints)
    searcher = Searcher(str(out))
    assert (searcher.tables["segments"].rerank, searcher.tables["segments"].nprobe) == (c["rerank"], c["nprobe"])
    got = _recall(searcher, vectors, queries)
    assert got == pytest.approx(c["recall"], abs=1e-6) and got >= c["target_recall"]
    smaller = CONFIG.reranks[CONFIG.reranks.index(c["rerank"]) - 1]
    assert c["rerank"] != CONFIG.reranks[0], "the test needs a depth below the chosen one"
    assert _recall(Searcher(str(out), rerank=smaller), vectors, queries) < c["target_recall"]
    assert Searcher(str(out), rerank=3).tables["segments"].rerank == 3  # a given depth wins


def test_search_job_reports_the_calibration(calibrated, capsys):
    out, _ = calibrated
    c = IndexFiles(str(out)).info()["tables"]["segments"]["calibration"]
    assert search_job.main(["--output", str(out), "--text", "rain", "--k", "3", "--json"]) == 0
    captured = capsys.readouterr()
    assert len([json.loads(line) for line in captured.out.splitlines()]) == 3
    assert f"re-rank {c['rerank']} x k" in captured.err and f"recall@10 {c['recall']:.3f}" in captured.err
    assert f"nprobe {c['nprobe']}" in captured.err and f"{c['queries']} label queries, {c['ms']:.1f} ms" in captured.err
    assert search_job.main(["--output", str(out), "--text", "rain", "--rerank", "3"]) == 0
    assert "re-rank 3 x k (--rerank)" in capsys.readouterr().err


def test_update_keeps_or_measures_again(calibrated, checkpoints, tmp_path):
    import shutil

    out, vectors = calibrated
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = IndexFiles(str(copy)).info()["tables"]["segments"]["calibration"]
    info = append_synthetic_index(str(copy), _rows(1_000, 1), ANN, CONFIG)  # +5%: kept
    assert info["tables"]["segments"]["calibration"] == before
    info = append_synthetic_index(str(copy), _rows(5_000, 2), ANN, CONFIG)  # +30% of the calibrated rows
    after = info["tables"]["segments"]["calibration"]
    assert after["rows"] == ROWS + 6_000 and IndexFiles(str(copy)).info()["tables"]["segments"]["calibration"] == after


def test_probes_widen_when_no_depth_reaches_the_target(checkpoints, tmp_path):
    """From one list no depth reaches the target; of the wider probe counts that do, the fastest measured
    is kept (each setting timed one query at a time)."""
    ann = AnnConfig(pq_m=8, min_rows=1_000, nlist=64, probe_fraction=1 / 64, min_scan_rows=0)  # 1 list
    info = write_synthetic_index(str(tmp_path), _rows(5_000, 3), ann,
                                 CalibrationConfig(reranks=(64,), probe_factors=(0.5, 1, 4, 16, 64)),
                                 clap=checkpoints["clap"], labels=label_names(checkpoints["ast"]))
    c = info["tables"]["segments"]["calibration"]
    assert [m["nprobe"] for m in c["measured"]] == [1, 4, 16, 64]  # 0.5 x 1 list is still one list
    assert c["measured"][0]["recall"] < 0.95 and all(m["ms"] > 0 for m in c["measured"])
    reached = [m for m in c["measured"] if m["recall"] >= 0.95]
    assert c["nprobe"] > 1 and c["reached"] and reached
    assert {k: c[k] for k in ("nprobe", "rerank", "recall", "ms")} == min(reached, key=lambda m: m["ms"])


def test_the_ann_keeps_the_label_prompts_mean_as_an_axis(checkpoints, tmp_path):
    """Training takes the calibration's own query embeddings (the label prompts through the CLAP text
    tower): the projection's axis is their mean direction, recomputed here with HF's ClapModel."""
    import faiss

    ann = AnnConfig(pq_m=4, project_dim=8, min_rows=1_000)  # 16-d rows -> 8-d IVF-PQ: 6 spread + axis + 0
    info = write_synthetic_index(str(tmp_path), _rows(5_000, 6), ann, CalibrationConfig(probe_factors=(1.0,)),
                                 clap=checkpoints["clap"], labels=label_names(checkpoints["ast"]))
    entry = info["tables"]["segments"]
    assert entry["query_axis"] is True and entry["calibration"]["reached"]
    ivf = faiss.read_index(str(tmp_path / "_index" / entry["ann"]))
    transform = faiss.downcast_VectorTransform(ivf.chain.at(0))
    matrix = faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
    mean = _queries(checkpoints).mean(axis=0)
    assert np.allclose(matrix[6], mean / np.linalg.norm(mean), atol=1e-5) and not matrix[7].any()


def test_index_too_small_for_an_ann_needs_no_calibration(checkpoints, tmp_path, capsys):
    info = write_synthetic_index(str(tmp_path), _rows(500, 4), ANN, CONFIG, clap=checkpoints["clap"],
                                 labels=label_names(checkpoints["ast"]))
    assert info["tables"]["segments"]["calibration"]["needed"] is False
    assert search_job.main(["--output", str(tmp_path), "--text", "rain", "--k", "2"]) == 0
    assert "no calibration needed" in capsys.readouterr().err


def test_calibration_measures_live_rows_as_the_searcher_does(checkpoints, tmp_path):
    """With dead rows (replaced by newer results), the calibration searches the live rows with the probes
    the Searcher widens for them: the recorded recall is the Searcher's against brute force over live rows."""
    import pyarrow as pa

    from pipeline.retrieval.calibrate import calibrate

    ann = AnnConfig(pq_m=8, min_rows=1_000, nlist=64, probe_fraction=0.125, min_scan_rows=0)
    vectors = _rows(8_000, 5)
    info = write_synthetic_index(str(tmp_path), vectors, ann, clap=checkpoints["clap"],
                                 labels=label_names(checkpoints["ast"]))
    files = IndexFiles(str(tmp_path))
    meta = files.path(info["tables"]["segments"]["meta"])
    table = pa.ipc.open_file(meta).read_all()
    live = np.arange(len(table)) % 2 == 0  # half the rows dead: the Searcher probes sqrt(2) times the lists
    with pa.OSFile(meta, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:  # rewritten in place: a test
        w.write_table(table.set_column(table.schema.get_field_index("live"), "live", pa.array(live)))
    info = files.info()
    calibrate(info, files.path, ann, CalibrationConfig(reranks=(64,), probe_factors=(1,)))  # the probes bind
    files.new_stage()
    files.publish(info)
    c = info["tables"]["segments"]["calibration"]
    assert c["live"] == int(live.sum()) and c["nprobe"] == 8  # 1/8 of 64 lists, before widening
    dead = vectors.copy()
    dead[~live] = 0  # brute force over the live rows only (a dead row scores 0, below the top 10 here)
    searcher = Searcher(str(tmp_path))
    assert searcher.tables["segments"].rerank == c["rerank"]
    assert _recall(searcher, dead, _queries(checkpoints)) == pytest.approx(c["recall"], abs=1e-9)

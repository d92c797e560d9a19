"""Search over real job output (tiny CLAP): exact = brute force, text queries = HF ClapModel ranked by
hand, filters keep k, audio and more-like-this, zero-shot, duplicates, incremental index updates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, ClapModel

from pipeline.store.ledger import read_current
from pipeline.retrieval.index import build_index
from pipeline.tagging.job import TagJobConfig, run_tag_job
from pipeline.retrieval.search import Filters, Searcher, SearchError
from tests.audio import encode, signal

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tagged(tmp_path_factory, checkpoints, local_ray):
    corpus = tmp_path_factory.mktemp("search-corpus")
    out = tmp_path_factory.mktemp("search-out")
    for i in range(10):
        seconds = 25.0 if i % 4 == 0 else 2.0 + i
        sub = corpus / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"clip{i}.wav").write_bytes(encode(signal(seconds, 16_000, seed=i), 16_000, "WAV", "FLOAT"))
    (corpus / "b" / "copy_of_clip1.wav").write_bytes((corpus / "a" / "clip1.wav").read_bytes())
    run_tag_job(TagJobConfig(input=str(corpus), output=str(out), ast_model=checkpoints["ast"],
                             clap_model=checkpoints["clap"], run_id="s1"))
    build_index(str(out))
    return corpus, out


def _brute(out: Path):
    """The segments and their embeddings as the index stores them (float16), scored in float32."""
    segs = read_current(str(out), "segments").to_pandas()
    return segs, np.stack(segs.clap_embedding.to_numpy()).astype(np.float16).astype(np.float32)


def test_exact_search_equals_brute_force(tagged):
    _, out = tagged
    searcher = Searcher(str(out), exact=True)
    segs, matrix = _brute(out)
    q = matrix[3] + 0.1 * np.random.default_rng(0).standard_normal(matrix.shape[1]).astype(np.float32)
    q /= np.linalg.norm(q)
    hits = searcher.vector(q, 5, segments=True)
    expected = np.argsort(-(matrix @ q), kind="stable")[:5]
    assert [(h.clip_id, h.start_s) for h in hits] == list(zip(segs.clip_id.iloc[expected], segs.start_s.iloc[expected]))
    np.testing.assert_allclose([h.score for h in hits], (matrix @ q)[expected], rtol=0, atol=1e-5)

    clip_hits = searcher.vector(q, 4)
    best = segs.assign(score=matrix @ q).sort_values("score", ascending=False).drop_duplicates("clip_id")
    assert [h.clip_id for h in clip_hits] == list(best.clip_id[:4])
    assert len({h.clip_id for h in clip_hits}) == 4


def test_index_built_a_few_rows_at_a_time_holds_the_same_rows(tagged, tmp_path, monkeypatch):
    """The build streams the current table in batches: with batches of 3 rows the index holds the same
    rows, metadata and vectors (row for row) as the one built from batches of 64k."""
    import functools
    import shutil

    import pyarrow as pa

    from pipeline.retrieval import rows
    from pipeline.retrieval.files import IndexFiles, store_of

    _, out = tagged
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("_index"))
    monkeypatch.setattr(rows, "current_batches", functools.partial(rows.current_batches, batch_rows=3))
    small = build_index(str(copy))
    big = Searcher(str(out)).info
    for table in ("clips", "segments"):
        assert small["rows"][table] == big["rows"][table] > 3
        metas = []
        for root, info in ((copy, small), (out, big)):
            meta = pa.ipc.open_file(str(root / "_index" / info["tables"][table]["meta"])).read_all()
            vectors = store_of(IndexFiles(str(root)), info["tables"][table], info["dim"])
            metas.append(meta.drop_columns(["run_id"]).to_pandas().assign(
                vector=list(vectors.get(np.arange(len(meta))))).sort_values(["clip_id", "start_s"]
                                                                           if table == "segments" else ["clip_id"]))
        pd.testing.assert_frame_equal(metas[0].reset_index(drop=True), metas[1].reset_index(drop=True))


def test_text_query_matches_hf_clap_ranked_by_hand(tagged, checkpoints):
    _, out = tagged
    hits = Searcher(str(out)).text("dog barking in the rain", k=5, segments=True)
    model = ClapModel.from_pretrained(checkpoints["clap"]).eval()
    tok = AutoTokenizer.from_pretrained(checkpoints["clap"])
    with torch.inference_mode():
        t = model.get_text_features(**tok(["dog barking in the rain"], return_tensors="pt")).pooler_output[0].numpy()
    segs, matrix = _brute(out)
    order = np.argsort(-(matrix @ t), kind="stable")[:5]
    assert [(h.clip_id, h.start_s) for h in hits] == list(zip(segs.clip_id.iloc[order], segs.start_s.iloc[order]))


def test_filters_keep_k_results(tagged):
    _, out = tagged
    searcher = Searcher(str(out), exact=True)
    clips = read_current(str(out)).to_pandas()
    q = np.stack(clips.clap_embedding)[0]
    long_ids = set(clips[clips.duration_s >= 8].clip_id)
    hits = searcher.vector(q, 3, Filters(min_duration_s=8))
    assert len(hits) == 3 and {h.clip_id for h in hits} <= long_ids
    a_ids = {c for c, u in zip(clips.clip_id, clips.uri) if "/a/" in u}
    prefix = str(Path(clips.uri[clips.uri.str.contains("/a/")].iloc[0]).parent)
    hits = searcher.vector(q, 10, Filters(uri_prefix=prefix))
    assert {h.clip_id for h in hits} == a_ids
    label = searcher.labels[-1]  # not the first: the filter must read this label's column
    scores = np.stack(read_current(str(out), "segments").to_pandas().scores)[:, -1]
    threshold = float(np.sort(scores)[len(scores) // 2])
    hits = searcher.vector(q, 50, Filters(label=label, min_score=threshold), segments=True)
    assert len(hits) == int((scores >= threshold).sum()) and all(h.start_s is not None for h in hits)
    with pytest.raises(SearchError, match="unknown label"):
        searcher.vector(q, 3, Filters(label="Not A Label"))


def test_audio_query_and_more_like_this(tagged):
    corpus, out = tagged
    searcher = Searcher(str(out))
    hits = searcher.audio((corpus / "a" / "clip3.wav").read_bytes(), k=3)
    assert hits[0].uri == str(corpus / "a" / "clip3.wav") and hits[0].score == pytest.approx(1.0, abs=1e-3)
    like = searcher.like(hits[0].clip_id, k=3)
    assert hits[0].clip_id not in {h.clip_id for h in like} and len(like) == 3
    with pytest.raises(SearchError, match="unknown clip_id"):
        searcher.like("nope")


def test_zero_shot_and_duplicates(tagged):
    corpus, out = tagged
    searcher = Searcher(str(out), exact=True)
    rows = searcher.zero_shot(["dog", "rain", "siren"], top=3)
    assert len(rows) == 11 and all(abs(sum(d["score"] for d in r["labels"]) - 1) < 1e-5 for r in rows)
    text = searcher.embed_text([f"This is a sound of {x}." for x in ("dog", "rain", "siren")])
    clips = read_current(str(out)).to_pandas().set_index("clip_id")
    r = rows[0]
    logits = searcher._text.logit_scale * (np.asarray(clips.loc[r["clip_id"]].clap_embedding) @ text.T)
    assert r["labels"][0]["label"] == ["dog", "rain", "siren"][int(np.argmax(logits))]
    pairs = searcher.duplicates(0.9999)
    names = {(Path(p["uri_a"]).name, Path(p["uri_b"]).name) for p in pairs}
    assert {("clip1.wav", "copy_of_clip1.wav"), ("copy_of_clip1.wav", "clip1.wav")} & names
    assert all(p["score"] >= 0.9999 for p in pairs)


def test_index_update_covers_new_runs_and_stale_index_falls_back(tagged, checkpoints, tmp_path):
    corpus, out = tagged
    new = corpus / "a" / "new_clip.wav"
    new.write_bytes(encode(signal(4.0, 16_000, seed=99), 16_000, "WAV"))
    changed = corpus / "b" / "clip2.wav"
    changed.write_bytes(encode(signal(6.5, 16_000, seed=98), 16_000, "WAV", "FLOAT"))
    try:
        run_tag_job(TagJobConfig(input=str(corpus), output=str(out), ast_model=checkpoints["ast"],
                                 clap_model=checkpoints["clap"], run_id="s2"))
        stale = Searcher(str(out))
        assert stale.stale and stale.exact
        info = build_index(str(out))
        assert info["versions"] == {"clips": 1, "segments": 2} and info["shard"] == 2  # segments: + cleanup
        fresh = Searcher(str(out))
        assert not fresh.stale
        clips = fresh.tables["clips"]
        assert info["rows"]["clips"] == 13 and info["live"]["clips"] == 12  # 11 + new + changed; old clip2 dead
        hits = fresh.audio(new.read_bytes(), k=1)
        assert hits[0].uri == str(new)
        uris = clips.data.column("uri").to_pylist()
        rows = [i for i, u in enumerate(uris) if u == str(changed)]
        assert len(rows) == 2 and clips.live[rows].tolist() == [False, True]
        assert clips.data.column("duration_s")[rows[1]].as_py() == pytest.approx(6.5)
    finally:
        new.unlink()


def test_model_mismatch_is_refused(tagged):
    _, out = tagged
    with pytest.raises(SearchError, match="embedded with"):
        Searcher(str(out), clap_model="laion/clap-htsat-fused")


def test_search_cli_json_and_table(tagged):
    _, out = tagged
    run = lambda *a: subprocess.run([sys.executable, "-m", "jobs.search", "--output", str(out), *a], cwd=REPO,
                                    capture_output=True, text=True, timeout=300)
    proc = run("--text", "rain", "--k", "3", "--json", "--segments")
    assert proc.returncode == 0, proc.stderr
    assert "no calibration needed" in proc.stderr  # a few rows: no ANN, exact (tests/test_calibration.py: an ANN)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 3 and {"clip_id", "uri", "score", "start_s", "end_s"} <= set(rows[0])
    table = run("--text", "rain", "--k", "2")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == ["clip_id", "uri", "score"]
    bad = run("--text", "rain", "--k", "0")
    assert bad.returncode == 2 and "--k must be" in bad.stderr
    deeper = run("--text", "rain", "--k", "3", "--json", "--segments", "--rerank", "100")
    assert deeper.returncode == 0 and [json.loads(line) for line in deeper.stdout.splitlines()] == rows
    assert run("--text", "rain", "--rerank", "0").returncode == 2
    unknown = run("--like", "no-such-clip")
    assert unknown.returncode == 2 and "unknown clip_id" in unknown.stderr


def test_projection_keeps_inner_products_in_its_subspace():
    """The ANN's projection is uncentred: for rows in a 49-d subspace of 512-d (48 varying directions and a
    constant offset) projected inner products equal the original ones, so the IVF-PQ ranks as exact search
    would (a centred PCA would drop the offset's direction)."""
    from pipeline.retrieval.ann import projection

    rng = np.random.default_rng(0)
    basis = rng.standard_normal((49, 512)).astype(np.float32)
    offset = 3.0 * basis[48]  # every row shares it: no variance along it, but it is in every inner product
    rows = rng.standard_normal((5_000, 48)).astype(np.float32) @ basis[:48] + offset
    queries = rng.standard_normal((5, 49)).astype(np.float32) @ basis
    transform = projection(rows, 49)
    assert (transform.d_in, transform.d_out) == (512, 49)
    want = queries @ rows.T
    got = transform.apply(queries) @ transform.apply(rows).T
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_projection_keeps_the_query_axis_exactly():
    """With a query mean, the projection's last sub-quantizer's width is that direction and zeros, the
    leading outputs are orthogonal to it, and inner products stay those of the kept subspace."""
    from pipeline.retrieval.ann import projection

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5_000, 64)).astype(np.float32) * np.linspace(2, 0.1, 64, dtype=np.float32)
    mean = rng.standard_normal(64)
    transform = projection(rows, 16, query_mean=mean, axis_width=4)
    matrix = faiss_matrix(transform)
    axis = mean / np.linalg.norm(mean)
    assert matrix.shape == (16, 64)
    assert np.allclose(matrix[12], axis, atol=1e-6) and not matrix[13:].any()
    assert np.abs(matrix[:12] @ axis).max() < 1e-5
    assert np.allclose(matrix[:12] @ matrix[:12].T, np.eye(12), atol=1e-5)  # orthonormal: inner products kept
    projected = transform.apply(rows)
    assert np.allclose(projected[:, 12], rows @ axis, atol=1e-5)  # each row's share of the axis, exactly


def faiss_matrix(transform) -> np.ndarray:
    import faiss

    return faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)


def test_the_query_axis_lifts_recall_for_queries_from_another_distribution(tmp_path):
    """Text queries carry a common direction the rows lack (CLAP's modality gap; modeled by
    `synthetic_queries(kind="shifted")`): with calibration queries of that distribution (another draw than
    the measured ones), the ANN that keeps their mean as an axis finds the true top 10 at a re-rank depth
    where the one without it falls short (50k power-law rows, exact truth over the stored float16 rows)."""
    from benchmarks.search import synthetic_blocks, synthetic_queries
    from benchmarks.synthetic_index import write_synthetic_index
    from pipeline.retrieval.ann import AnnConfig

    rows = np.concatenate(list(synthetic_blocks(50_000, latent=0, seed=3)))
    measured = synthetic_queries(100, latent=0, seed=3, kind="shifted")
    calibration = synthetic_queries(200, latent=0, seed=3, kind="shifted", draw=1)
    truth = np.argsort(-(measured @ rows.astype(np.float16).astype(np.float32).T), axis=1, kind="stable")[:, :10]
    recall = {}
    for axis in (False, True):
        out = tmp_path / str(axis)
        info = write_synthetic_index(str(out), rows, AnnConfig(query_axis=axis), queries=calibration)
        assert info["tables"]["segments"]["query_axis"] is axis
        searcher = Searcher(str(out), rerank=10)
        found = [{int(h.uri.rsplit("/", 1)[1]) for h in searcher.vector(q, 10, segments=True)} for q in measured]
        recall[axis] = np.mean([len(set(t.tolist()) & f) / 10 for t, f in zip(truth, found)])
    assert recall[True] >= 0.95 > recall[False] and recall[True] - recall[False] >= 0.04, recall


def test_ann_recall_filters_and_incremental_update(tmp_path):
    """50k synthetic 512-d vectors through the real index files and Searcher: IVF-PQ + re-ranking has
    recall@10 >= 0.95 against exact with exact scores; a filter keeping 11% of rows still yields k hits
    from the ANN path; appending rows adds them to the IVF lists without retraining, and they are found."""
    import faiss

    from benchmarks.search import synthetic
    from benchmarks.synthetic_index import append_synthetic_index, write_synthetic_index
    from pipeline.retrieval.ann import AnnConfig

    vectors, queries = synthetic(50_000, seed=1)
    info = write_synthetic_index(str(tmp_path), vectors)
    assert info["tables"]["segments"]["ann"]
    built = faiss.read_index(str(tmp_path / "_index" / info["tables"]["segments"]["ann"]))
    assert faiss.downcast_VectorTransform(built.chain.at(0)).d_out == AnnConfig().project_dim  # IVF-PQ in 128-d
    exact, approx = Searcher(str(tmp_path), exact=True), Searcher(str(tmp_path))
    recalls = []
    for q in queries[:50]:
        want = exact.vector(q, 10, segments=True)
        got = approx.vector(q, 10, segments=True)
        recalls.append(len({h.clip_id for h in want} & {h.clip_id for h in got}) / 10)
        stored = vectors[[int(h.uri.rsplit("/", 1)[1]) for h in got]].astype(np.float16).astype(np.float32)
        np.testing.assert_allclose([h.score for h in got], stored @ q, atol=1e-5)  # re-ranked: exact scores
    assert np.mean(recalls) >= 0.95, np.mean(recalls)
    prefix = "synthetic://1"  # ids 1, 10-19, 100-199, ...: 11,111 of 50,000 rows
    for subset in (True, False):  # the filter's own PQ codes, or the IVF lists with an id selector
        filtered = Searcher(str(tmp_path), exact_below=1_000, subset_fraction=0.3 if subset else 0.0)
        recalls = []
        for q in queries[:20]:
            hits = filtered.vector(q, 10, Filters(uri_prefix=prefix), segments=True)
            assert len(hits) == 10 and all(h.uri.startswith(prefix) for h in hits)
            want = {h.clip_id for h in exact.vector(q, 10, Filters(uri_prefix=prefix), segments=True)}
            recalls.append(len(want & {h.clip_id for h in hits}) / 10)
        assert np.mean(recalls) >= 0.9, (subset, np.mean(recalls))
        table = filtered.tables["segments"]
        assert (table.mask(Filters(uri_prefix=prefix), filtered.labels).subset is not None) == subset
    rare = Filters(label="synthetic", min_score=0.9995)  # a few dozen rows: exact over the matches, all of them
    matching = int((((np.arange(50_000) * 0.6180339887498949) % 1.0).astype(np.float32) >= 0.9995).sum())
    assert 0 < matching < 100 and len(filtered.vector(queries[0], 100, rare, segments=True)) == matching

    def ann_file():
        return faiss.read_index(str(tmp_path / "_index" / Searcher(str(tmp_path)).info["tables"]["segments"]["ann"]))

    before = ann_file()  # kept alive: extract_index_ivf returns a view into it
    centroids = faiss.extract_index_ivf(before).quantizer.reconstruct_n(0, 8)
    new = synthetic(52_000, seed=2)[0][50_000:]
    info = append_synthetic_index(str(tmp_path), new, AnnConfig())
    assert info["rows"]["segments"] == 52_000 and len(info["tables"]["segments"]["vectors"]) == 2
    after = ann_file()
    assert after.ntotal == 52_000
    np.testing.assert_array_equal(faiss.extract_index_ivf(after).quantizer.reconstruct_n(0, 8), centroids)
    updated = Searcher(str(tmp_path))
    in_five = Filters(uri_prefix="synthetic://5")  # 3,111 rows, 2,000 of them new: the flat codes' path
    for i in (0, 777, 1999):
        hit = updated.vector(new[i], 1, segments=True)[0]
        assert hit.uri == f"synthetic://{50_000 + i}" and hit.score == pytest.approx(1.0, abs=1e-3)
        hit = Searcher(str(tmp_path), exact_below=1_000).vector(new[i], 1, in_five, segments=True)[0]
        assert hit.uri == f"synthetic://{50_000 + i}"
    # the label filter reads both score shards (the first build's, kept, and the update's): exact counts
    assert [s["rows"] for s in info["tables"]["segments"]["scores"]] == [50_000, 2_000]
    golden = (np.arange(52_000) * 0.6180339887498949) % 1.0
    high = updated.tables["segments"].mask(Filters(label="synthetic", min_score=0.9), updated.labels)
    assert high.count == int((golden.astype(np.float32) >= 0.9).sum())
    assert sorted(p.name for p in (tmp_path / "_index").iterdir()) == sorted(
        ["index.json"] + [info["tables"]["segments"][k] for k in ("meta", "ann", "codes")]
        + [v["file"] for v in info["tables"]["segments"]["vectors"] + info["tables"]["segments"]["scores"]])
    # the replaced generation's files are gone


def test_tag_job_zero_shot_matches_clap_logits_per_audio(checkpoints, tmp_path, local_ray):
    from tests import reference as ref

    corpus = tmp_path / "in"
    corpus.mkdir()
    samples = signal(3.0, 48_000, seed=5)
    (corpus / "a.wav").write_bytes(encode(samples, 48_000, "WAV", "FLOAT"))
    labels = ("dog", "rain", "siren", "engine")
    run_tag_job(TagJobConfig(input=str(corpus), output=str(tmp_path / "out"), ast_model=checkpoints["ast"],
                             clap_model=checkpoints["clap"], top_k=4, zero_shot_labels=labels, run_id="zs"))
    row = read_current(str(tmp_path / "out")).to_pylist()[0]
    extractor, model = ref._clap(checkpoints["clap"])
    tok = AutoTokenizer.from_pretrained(checkpoints["clap"])
    texts = tok([f"This is a sound of {x}." for x in labels], padding=True, return_tensors="pt")
    audio = extractor(samples[:, 0], sampling_rate=48_000, return_tensors="pt")
    with torch.inference_mode():
        probs = model(**texts, **audio).logits_per_audio.softmax(-1)[0].numpy()
    got = {d["label"]: d["score"] for d in row["zero_shot"]}
    np.testing.assert_allclose([got[x] for x in labels], probs, atol=1e-4, rtol=0)


def test_index_in_object_storage_loads_lazily(tmp_path, monkeypatch):
    """An index written to the S3 test server: a Searcher downloads index.json, row metadata and the
    IVF-PQ at start, each float16 vector shard on the first query that needs it, and answers as the
    same index on local disk does."""
    import fsspec
    import s3fs

    from benchmarks.search import synthetic
    from benchmarks.synthetic_index import write_synthetic_index
    from pipeline.retrieval.ann import AnnConfig
    from tests.s3 import MotoS3

    vectors, queries = synthetic(30_000, seed=3)
    ann = AnnConfig(shard_rows=16_384)  # two shards
    with MotoS3() as moto:
        moto.use(monkeypatch, tmp_path / "cache")
        try:
            fsspec.filesystem("s3").mkdir("indexes")
            info = write_synthetic_index("s3://indexes/out", vectors, ann)
            entry = info["tables"]["segments"]
            assert len(entry["vectors"]) == 2 and entry["ann"]
            assert sorted(p.rsplit("/", 1)[1] for p in fsspec.filesystem("s3").ls("indexes/out/_index")) == sorted(
                ["index.json", entry["meta"], entry["ann"], entry["codes"]]
                + [v["file"] for v in entry["vectors"] + entry["scores"]])
            for cached in (tmp_path / "cache").rglob("*"):  # the writer's own cache: start empty, as a service would
                if cached.is_file():
                    cached.unlink()
            remote = Searcher("s3://indexes/out")
            cache = next((tmp_path / "cache" / "indexes").iterdir())
            assert sorted(p.name for p in cache.iterdir()) == sorted([entry["meta"], entry["ann"]])
            hits = remote.vector(queries[0], 10, segments=True)
            assert {p.name for p in cache.iterdir()} >= {v["file"] for v in entry["vectors"]}
            assert entry["codes"] not in {p.name for p in cache.iterdir()}  # flat codes: on the first filter
            filtered = Searcher("s3://indexes/out", exact_below=1_000).vector(  # 1,111 rows: not exact
                queries[0], 10, Filters(uri_prefix="synthetic://12"), segments=True)
            assert entry["codes"] in {p.name for p in cache.iterdir()}
            # a label filter reads one label's column of the score shards by ranged reads: no download
            high = remote.tables["segments"].mask(Filters(label="synthetic", min_score=0.9), remote.labels)
            golden = ((np.arange(30_000) * 0.6180339887498949) % 1.0).astype(np.float32)
            assert high.count == int((golden >= 0.9).sum())
            assert not {s["file"] for s in entry["scores"]} & {p.name for p in cache.iterdir()}
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
    write_synthetic_index(str(tmp_path / "local"), vectors, ann)
    local = Searcher(str(tmp_path / "local")).vector(queries[0], 10, segments=True)
    assert [h.uri for h in hits] == [h.uri for h in local]
    np.testing.assert_allclose([h.score for h in hits], [h.score for h in local], atol=1e-6)
    local = Searcher(str(tmp_path / "local"), exact_below=1_000).vector(
        queries[0], 10, Filters(uri_prefix="synthetic://12"), segments=True)
    assert [h.uri for h in filtered] == [h.uri for h in local]

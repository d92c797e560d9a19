"""End to end through real Ray: a mixed corpus of good and broken files -> Parquet -> read back.

Checks accounting (one clips row per input, reasons), schemas, readers (pandas, pyarrow, DuckDB),
parity of every window and every clip with the HF reference run one window at a time, and
determinism across runs with different batch sizes.
"""

from __future__ import annotations

import json
import logging

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
import torch

from pipeline.tagging.job import TagJobConfig, run_tag_job
from pipeline.audio.windows import sample_span
from pipeline.store.writer import METADATA_KEY
from schemas import clips_schema, segments_schema, validate_table
from tests import reference as ref
from tests.audio import BROKEN_REASONS, broken_files, encode, encode_m4a, signal

GOOD = {  # name -> bytes
    "speechlike_8k.wav": encode(signal(1.2, 8_000, seed=1), 8_000, "WAV", "PCM_16"),
    "music_44k_stereo.flac": encode(signal(4.0, 44_100, 2, seed=2), 44_100, "FLAC"),
    "ambience_22k.ogg": encode(signal(6.0, 22_050, seed=3), 22_050, "OGG"),
    "long_16k.flac": encode(signal(60.0, 16_000, seed=4), 16_000, "FLAC"),
    "odd_25s_48k.mp3": encode(signal(25.0, 48_000, seed=5), 48_000, "MP3"),
}
EXPECTED_ERRORS = BROKEN_REASONS  # the other broken files decode to valid results


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, data in {**GOOD, **broken_files()}.items():
        (root / name).write_bytes(data)
    (root / "README.txt").write_text("not audio, not listed")
    return root


@pytest.fixture(scope="module")
def run(corpus, checkpoints, tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("out")
    # micro-batch 4 (not the CPU default of 1), so padded forward passes are what the parity tests check
    cfg = TagJobConfig(input=str(corpus), output=str(out), ast_model=checkpoints["ast"],
                       clap_model=checkpoints["clap"], top_k=3, batch_size=32, micro_batch=4, run_id="run-a")
    return out, run_tag_job(cfg)


def _read(out, table):
    return pd.read_parquet(out / table).sort_values(["clip_id"] + (["segment_index"] if table == "segments" else []))


def test_every_input_has_one_row_with_status_and_reason(run, corpus):
    out, summary = run
    clips = _read(out, "clips")
    names = sorted(p.name for p in corpus.iterdir() if p.suffix != ".txt")
    assert sorted(clips.uri.map(lambda u: u.rsplit("/", 1)[-1])) == names
    assert clips.clip_id.is_unique
    by_name = clips.set_index(clips.uri.map(lambda u: u.rsplit("/", 1)[-1]))
    for name in names:
        row = by_name.loc[name]
        if name in EXPECTED_ERRORS:
            assert row.status == "error" and row.error.startswith(EXPECTED_ERRORS[name]), (name, row.error)
            assert row.clap_embedding is None and row.num_segments == 0
        else:
            assert row.status == "ok" and pd.isna(row.error), (name, row.error)
            assert len(row.labels) == 3 and row.num_segments >= 1
    assert by_name.loc["m4a_named.wav"].decoder == "pyav"
    for name in names:  # cut files keep the audio that is there and say so
        truncated = name in ("truncated.mp3", "truncated_body.wav")
        warning = by_name.loc[name].warning
        assert warning.startswith("body shorter than header declares") if truncated else pd.isna(warning), name
    assert by_name.loc["long_16k.flac"].num_segments == 6
    assert by_name.loc["odd_25s_48k.mp3"].num_segments == 3
    assert summary["files_seen"] == len(names) and summary["error"] == len(EXPECTED_ERRORS)
    assert summary["errors_by_reason"] == {"audio contains NaN or infinite sample values": 2, "empty file": 1,
                                           "no audio samples": 2, "not a decodable audio file": 2}
    assert summary["warnings_by_reason"] == {"body shorter than header declares": 2}
    saved = json.loads((out / "_runs" / "run-a.json").read_text())
    assert saved == summary and saved["succeeded"]


def test_tables_match_declared_schemas_and_readers_agree(run, checkpoints):
    out, _ = run
    for table, make in (("clips", clips_schema), ("segments", segments_schema)):
        files = sorted((out / table / "run-a").glob("*.parquet"))
        assert files and not list((out / table / "run-a").glob("_*"))
        arrow = pq.read_table(files[0])
        validate_table(arrow.replace_schema_metadata(None), make(8, 32, 16).remove_metadata())
        meta = json.loads(arrow.schema.metadata[METADATA_KEY])
        assert meta["models"]["ast"]["source"] == checkpoints["ast"]
        assert meta["models"]["clap"]["untrained"] is True
        assert meta["models"]["ast"]["revision"].startswith("sha256:")
        assert meta["features"]["featurize"]["ast"]["num_mel_bins"] == 128
        assert meta["pipeline_version"] and meta["settings_hash"]
        n_pandas = len(pd.read_parquet(out / table))
        n_arrow = pads.dataset(out / table, format="parquet").count_rows()
        n_duck = duckdb.sql(f"select count(*) from read_parquet('{out}/{table}/**/*.parquet')").fetchall()[0][0]
        assert n_pandas == n_arrow == n_duck > 0
    lengths = duckdb.sql(f"select distinct len(clap_embedding), len(scores) from "
                         f"read_parquet('{out}/clips/**/*.parquet') where status = 'ok'").fetchall()
    assert lengths == [(16, 8)]


def test_windows_and_clips_equal_hf_reference(run, corpus, checkpoints):
    _assert_equal_hf_reference(run[0], corpus, checkpoints)


def _assert_equal_hf_reference(out, corpus, checkpoints, resample=ref.resample):
    clips = _read(out, "clips").set_index("uri")
    segments = _read(out, "segments")
    for uri, segs in segments.groupby("uri"):
        wave, rate = ref.load_mono((corpus / uri.rsplit("/", 1)[-1]).read_bytes())
        wave16, wave48 = resample(wave, rate, 16_000), resample(wave, rate, 48_000)
        ref_scores, ref_pooled, ref_clap = [], [], []
        for seg in segs.itertuples():
            logits, pooled = ref.ast_reference(checkpoints["ast"], wave16[sample_span(seg.start_s, 10.24, 16_000)])
            clap = ref.clap_reference(checkpoints["clap"], wave48[sample_span(seg.start_s, 10.0, 48_000)])
            ours_logits = torch.logit(torch.tensor(np.stack(seg.scores)).double()).numpy()
            np.testing.assert_allclose(ours_logits, logits, atol=1e-4, rtol=0)
            np.testing.assert_allclose(np.stack(seg.ast_embedding), pooled, atol=1e-4, rtol=0)
            assert float(np.dot(seg.clap_embedding, clap)) >= 0.9999
            ref_scores.append(torch.sigmoid(torch.tensor(logits)).numpy())
            ref_pooled.append(pooled)
            ref_clap.append(clap)
        clip = clips.loc[uri]
        np.testing.assert_allclose(clip.scores, np.max(ref_scores, axis=0), atol=1e-5, rtol=0)
        np.testing.assert_allclose(clip.ast_embedding, np.mean(ref_pooled, axis=0), atol=1e-4, rtol=0)
        mean = np.mean(ref_clap, axis=0)
        assert float(np.dot(clip.clap_embedding, mean / np.linalg.norm(mean))) >= 0.9999
        np.testing.assert_allclose([d["score"] for d in clip.labels],
                                   np.sort(np.max(ref_scores, axis=0))[::-1][:3], atol=1e-5, rtol=0)


def test_rerun_with_other_batch_sizes_is_identical(run, corpus, checkpoints, tmp_path):
    """Run A feeds the actors up to 32 windows at a time, run B 3: B's every forward pass is a
    micro-batch of 4 with padding, A's mostly full ones; the rows must still be bitwise equal."""
    out_a, _ = run
    cfg = TagJobConfig(input=str(corpus), output=str(tmp_path), ast_model=checkpoints["ast"],
                       clap_model=checkpoints["clap"], top_k=3, batch_size=3, micro_batch=4, windows_per_block=2,
                       run_id="run-b")
    run_tag_job(cfg)
    for table, keys in (("clips", ["clip_id"]), ("segments", ["clip_id", "segment_index"])):
        a = pd.read_parquet(out_a / table).sort_values(keys).reset_index(drop=True)
        b = pd.read_parquet(tmp_path / table).sort_values(keys).reset_index(drop=True)
        assert len(a) == len(b)
        for col in ("scores", "ast_embedding", "clap_embedding"):
            for x, y in zip(a[col], b[col]):
                assert (x is None and y is None) or np.array_equal(x, y), col
        assert a.drop(columns=["run_id", "scores", "ast_embedding", "clap_embedding", "labels"]).equals(
            b.drop(columns=["run_id", "scores", "ast_embedding", "clap_embedding", "labels"]))


def test_another_micro_batch_has_the_same_settings_and_results_within_ulps(run, corpus, checkpoints, tmp_path):
    """The micro-batch is not a setting (issue 21: the default follows the cluster's shape): another size
    gives the same settings hash, and results that differ only by float rounding (other GEMM shapes)."""
    out_a, _ = run
    cfg = TagJobConfig(input=str(corpus), output=str(tmp_path), ast_model=checkpoints["ast"],
                       clap_model=checkpoints["clap"], top_k=3, micro_batch=1, run_id="run-mb1")
    run_tag_job(cfg)
    a, b = _read(out_a, "segments").reset_index(drop=True), _read(tmp_path, "segments").reset_index(drop=True)
    for col in ("scores", "ast_embedding", "clap_embedding"):
        np.testing.assert_allclose(np.stack(a[col]), np.stack(b[col]), atol=2e-6, rtol=0)
    meta = [json.loads(pq.read_schema(next((out / "clips").rglob("part-*.parquet"))).metadata[METADATA_KEY])
            for out in (out_a, tmp_path)]
    assert meta[0]["settings_hash"] == meta[1]["settings_hash"]
    assert (meta[0]["compute"]["micro_batch"], meta[1]["compute"]["micro_batch"]) == (4, 1)


def test_featurize_stays_a_cpu_task_stage(checkpoints, local_ray, capsys):
    """Ray fuses a task stage into the next actor stage when their resources match; decoding inside
    the model actors would serialise it. The optimized physical plan keeps them apart."""
    from pipeline.tagging.job import build_dataset, model_stages
    from pipeline.tagging.resources import ResourcePlan
    from pipeline.tagging.sources import FILE_SCHEMA

    cfg = TagJobConfig(input=".", output=".", ast_model=checkpoints["ast"], clap_model=checkpoints["clap"])
    plan = ResourcePlan(1, 1, 0.0, 1.0, 1.0)  # actors ask for 1 CPU, like the featurize tasks
    build_dataset(pa.Table.from_pylist([{"clip_id": "c", "uri": "/nope.wav"}], schema=FILE_SCHEMA),
                  model_stages(cfg, plan), plan, 8).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(Featurize)]" in optimized
    assert "ActorPoolMapOperator[MapBatches(AstTagger)]" in optimized


def test_featurize_tasks_reserve_the_memory_of_their_lane(checkpoints, local_ray):
    """Short-file tasks reserve what a file of long_file_s may hold; the long-file lane reserves it for
    the longest accepted file, capped at the largest node's memory so its tasks can always be placed."""
    from pipeline.tagging.featurize import task_memory_bytes
    from pipeline.tagging.job import build_dataset, lanes, model_stages
    from pipeline.tagging.resources import ResourcePlan
    from pipeline.tagging.sources import FILE_SCHEMA

    cfg = TagJobConfig(input=".", output=".", ast_model=checkpoints["ast"], clap_model=checkpoints["clap"],
                       long_file_s=600.0)
    plan = ResourcePlan(1, 1, 0.0, 1.0, 1.0)
    stages = model_stages(cfg, plan)
    short, long = lanes(cfg, stages.featurize)
    largest = max(n["Resources"]["memory"] for n in ray.nodes() if n["Alive"])
    assert (short.max_s, long.max_s) == (600.0, None)
    assert short.memory == min(task_memory_bytes(stages.featurize, 600.0), int(0.9 * largest))
    assert 0.5e9 < short.memory < long.memory
    assert long.memory == min(task_memory_bytes(stages.featurize, 6 * 3600.0), int(0.9 * largest))
    files = pa.Table.from_pylist([{"clip_id": "c", "uri": "/nope.wav"}], schema=FILE_SCHEMA)
    op = build_dataset(files, stages, plan, 8, short)._logical_plan.dag
    while op.name != "MapBatches(Featurize)":
        op = op.input_dependencies[0]
    assert op.ray_remote_args["memory"] == short.memory


def test_files_longer_than_the_short_lane_run_in_the_long_lane_with_equal_results(checkpoints, local_ray,
                                                                                    tmp_path, caplog):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "long.flac").write_bytes(encode(signal(26.0, 16_000, seed=7), 16_000, "FLAC"))
    (corpus / "long.m4a").write_bytes(encode_m4a(signal(24.0, 22_050, 2, seed=8), 22_050))  # PyAV: no header count
    (corpus / "short.wav").write_bytes(encode(signal(5.0, 16_000, seed=9), 16_000, "WAV", "PCM_16"))
    tables = {}
    for name, long_file_s in (("one-lane", 1200.0), ("two-lanes", 20.0)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline.tagging.job"):
            summary = run_tag_job(TagJobConfig(input=str(corpus), output=str(tmp_path / name),
                                               ast_model=checkpoints["ast"], clap_model=checkpoints["clap"],
                                               long_file_s=long_file_s, run_id=name))
        assert (summary["ok"], summary["error"]) == (3, 0)
        assert ("2 files are longer than 20 s" in caplog.text) == (name == "two-lanes")
        tables[name] = {t: pd.read_parquet(tmp_path / name / t).sort_values(
            ["uri"] + (["segment_index"] if t == "segments" else [])).reset_index(drop=True)
            for t in ("clips", "segments")}
    for table in ("clips", "segments"):
        a, b = tables["one-lane"][table], tables["two-lanes"][table]
        assert len(a) == len(b) == (3 if table == "clips" else 3 + 3 + 1)
        for col in ("scores", "ast_embedding", "clap_embedding"):
            assert all(np.array_equal(x, y) for x, y in zip(a[col], b[col])), (table, col)


def test_features_on_the_model_actors_equal_the_hf_pipeline(run, corpus, checkpoints, tmp_path):
    """--features-on gpu (here on the CPU device, as on a CPU-only cluster): the featurize tasks only decode
    and ship source slices; the actors resample (torchaudio's resampler, as HF's pipeline does) and compute
    the features in fixed micro-batches. Same rows and reasons, parity with the HF reference fed that
    resampler's waveforms, and the mode is a setting."""
    out_a, summary_a = run
    cfg = TagJobConfig(input=str(corpus), output=str(tmp_path), ast_model=checkpoints["ast"],
                       clap_model=checkpoints["clap"], top_k=3, batch_size=5, micro_batch=4, windows_per_block=3,
                       features_on="gpu", run_id="run-gpu-features")
    summary = run_tag_job(cfg)
    assert {k: summary[k] for k in ("files_seen", "ok", "error", "errors_by_reason", "warnings_by_reason")} == \
        {k: summary_a[k] for k in ("files_seen", "ok", "error", "errors_by_reason", "warnings_by_reason")}
    _assert_equal_hf_reference(tmp_path, corpus, checkpoints, ref.resample_like_hf_pipeline)
    a, b = _read(out_a, "segments").reset_index(drop=True), _read(tmp_path, "segments").reset_index(drop=True)
    assert list(a.clip_id) == list(b.clip_id) and list(a.start_s) == list(b.start_s)
    rates = set(_read(tmp_path, "clips").sample_rate)
    assert {16_000, 48_000} < rates and len(rates - {16_000, 48_000}) >= 1, rates  # resampled and passed through
    meta = [json.loads(pq.read_schema(next((out / "clips").rglob("part-*.parquet"))).metadata[METADATA_KEY])
            for out in (out_a, tmp_path)]
    assert [m["features"]["featurize"]["features_on"] for m in meta] == ["cpu", "gpu"]
    assert meta[0]["settings_hash"] != meta[1]["settings_hash"]

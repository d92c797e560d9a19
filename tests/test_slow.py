"""Reliability, slow cases (`make reliability`, not in `make test`): an hour-long file and a corpus of
thousands of small files through the real job, with the driver's peak memory reported and bounded."""

from __future__ import annotations

import logging
import resource

import numpy as np
import pytest
import soundfile as sf

from pipeline.commits import read_current
from pipeline.job import TagJobConfig, run_tag_job
from tests.audio import encode, signal

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_hour_long_file(checkpoints, tmp_path, local_ray):
    rate = 16_000
    with sf.SoundFile(tmp_path / "hour.flac", "w", rate, 1, format="FLAC") as f:
        for minute in range(60):
            f.write(signal(60.0, rate, seed=minute)[:, 0])
    summary = run_tag_job(TagJobConfig(input=str(tmp_path / "hour.flac"), output=str(tmp_path / "out"),
                                       ast_model=checkpoints["ast"], clap_model=checkpoints["clap"], run_id="hour"))
    log.info("hour-long file: %s; driver peak RSS %.0f MB", summary, _peak_rss_mb())
    assert summary["ok"] == 1 and summary["segments"] == 360
    assert len(read_current(str(tmp_path / "out"), "segments")) == 360


@pytest.mark.parametrize("files", [3000])
def test_thousands_of_small_files(files, checkpoints, tmp_path, local_ray):
    corpus = tmp_path / "in"
    for i in range(files):
        d = corpus / f"d{i // 500}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.wav").write_bytes(encode(signal(0.5, 8_000, seed=i), 8_000, "WAV", "PCM_16"))
    before = _peak_rss_mb()
    summary = run_tag_job(TagJobConfig(input=str(corpus), output=str(tmp_path / "out"), ast_model=checkpoints["ast"],
                                       clap_model=checkpoints["clap"], run_id="many", batch_size=64))
    log.info("%d small files: %s; driver peak RSS %.0f MB (before %.0f MB)", files, summary, _peak_rss_mb(), before)
    assert summary["ok"] == files and summary["succeeded"]
    assert read_current(str(tmp_path / "out")).num_rows == files
    assert _peak_rss_mb() < before + 1024

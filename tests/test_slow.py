"""Reliability, slow cases (`make reliability`, not in `make test`): a few hour-long files and a corpus
of 10,000 small files through the real job, with peak memory reported (driver RSS, and PSS of the
driver plus every Ray process) and the driver's growth bounded."""

from __future__ import annotations

import logging
import resource

import numpy as np
import pytest
import soundfile as sf

from benchmarks.memory import PeakMemory
from pipeline.commits import read_current
from pipeline.job import TagJobConfig, run_tag_job
from tests.audio import encode, signal

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_few_hour_long_files(checkpoints, tmp_path, local_ray):
    rate, hours = 16_000, 3
    (tmp_path / "in").mkdir()
    for h in range(hours):
        with sf.SoundFile(tmp_path / "in" / f"hour{h}.flac", "w", rate, 1, format="FLAC") as f:
            for minute in range(60):
                f.write(signal(60.0, rate, seed=100 * h + minute)[:, 0])
    with PeakMemory() as peak:
        summary = run_tag_job(TagJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                                           ast_model=checkpoints["ast"], clap_model=checkpoints["clap"],
                                           run_id="hours"))
    log.info("%d hour-long files: %s; driver peak RSS %.0f MB; peak PSS of driver + Ray %.0f MB",
             hours, summary, _peak_rss_mb(), peak.peak_mb)
    assert summary["ok"] == hours and summary["segments"] == 360 * hours
    assert len(read_current(str(tmp_path / "out"), "segments")) == 360 * hours


@pytest.mark.parametrize("files", [10_000])
def test_thousands_of_small_files(files, checkpoints, tmp_path, local_ray):
    corpus = tmp_path / "in"
    for i in range(files):
        d = corpus / f"d{i // 500}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.wav").write_bytes(encode(signal(0.5, 8_000, seed=i), 8_000, "WAV", "PCM_16"))
    before = _peak_rss_mb()
    with PeakMemory() as peak:
        summary = run_tag_job(TagJobConfig(input=str(corpus), output=str(tmp_path / "out"),
                                           ast_model=checkpoints["ast"], clap_model=checkpoints["clap"],
                                           run_id="many", batch_size=64))
    log.info("%d small files: %s; driver peak RSS %.0f MB (before %.0f MB); peak PSS of driver + Ray %.0f MB",
             files, summary, _peak_rss_mb(), before, peak.peak_mb)
    assert summary["ok"] == files and summary["succeeded"]
    assert read_current(str(tmp_path / "out")).num_rows == files
    assert _peak_rss_mb() < before + 1024

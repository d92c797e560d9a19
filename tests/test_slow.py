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
from pipeline.store.ledger import read_current
from pipeline.tagging.job import TagJobConfig, run_tag_job
from tests.audio import encode, signal

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hour_long_flac(path, rate: int, seed: int) -> None:
    with sf.SoundFile(path, "w", rate, 1, format="FLAC") as f:
        for minute in range(60):
            f.write(signal(60.0, rate, seed=seed + minute)[:, 0])


def test_a_few_hour_long_files(checkpoints, tmp_path, local_ray):
    """Three hour-long files take no more memory than one: each is decoded, resampled and featurized
    on its own, never held all at once."""
    rate, hours = 16_000, 3
    (tmp_path / "in").mkdir()
    for h in range(hours):
        _hour_long_flac(tmp_path / "in" / f"hour{h}.flac", rate, seed=100 * h)
    paths = sorted((tmp_path / "in").iterdir())
    peaks = []
    for files in (1, hours):
        manifest = tmp_path / f"manifest{files}.txt"
        manifest.write_text("".join(f"{p}\n" for p in paths[:files]))
        with PeakMemory() as peak:
            summary = run_tag_job(TagJobConfig(input=str(manifest), output=str(tmp_path / f"out{files}"),
                                               ast_model=checkpoints["ast"], clap_model=checkpoints["clap"],
                                               run_id=f"hours{files}"))
        peaks.append(peak.peak_mb)
        log.info("%d hour-long file(s): %s; peak PSS of driver + Ray %.0f MB", files, summary, peak.peak_mb)
        assert summary["ok"] == files and summary["segments"] == 360 * files
        assert len(read_current(str(tmp_path / f"out{files}"), "segments")) == 360 * files
    log.info("peak PSS, %d hour-long files / 1: %.2f", hours, peaks[1] / peaks[0])
    assert peaks[1] <= 1.2 * peaks[0], peaks


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

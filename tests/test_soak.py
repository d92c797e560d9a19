"""The crash matrix, seeded soak (`make reliability`): a sequence of runs over one OUTPUT, each killed at
a random step of its commit sequence (or not), with files changing, new files and a settings change
(--replace-settings) along the way. After every run a plain Delta reader sees a consistent table; at the
end a clean run leaves the table equal to that of one clean run. `SOAK_SEED` and `SOAK_RUNS` vary it."""

from __future__ import annotations

import logging
import os
import random

import pytest

from pipeline.store.faults import STEPS
from tests.audio import encode, signal
from tests.crash import assert_consistent, assert_same_results, tag

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)


def test_seeded_soak_of_random_kill_points(checkpoints, tmp_path):
    seed, runs = int(os.environ.get("SOAK_SEED", "21")), int(os.environ.get("SOAK_RUNS", "14"))
    rng = random.Random(seed)
    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()
    manifest = tmp_path / "files.txt"

    def write(i: int, seconds: float, variant: int = 0) -> None:
        (corpus / f"f{i}.wav").write_bytes(encode(signal(seconds, 16_000, seed=100 * variant + i), 16_000, "WAV"))

    files = 6
    for i in range(files):
        write(i, rng.choice([4.0, 15.0, 25.0]))
    hop = "10"
    for n in range(runs):
        event = rng.random()
        if event < 0.25:
            write(rng.randrange(files), rng.choice([4.0, 15.0, 25.0]), variant=n + 1)
        elif event < 0.4:
            write(files, 12.0, variant=n + 1)
            files += 1
        elif event < 0.5 and hop == "10":
            hop = "5"
        manifest.write_text("".join(f"{corpus / f'f{i}.wav'}\n" for i in range(files)) + f"{corpus / 'gone.wav'}\n")
        fault = None if rng.random() < 0.25 else f"{rng.choice(STEPS)}@{rng.randint(1, 2)}"
        status, _, stderr = tag(manifest, out, checkpoints, f"r{n}", "--shard-files", str(rng.randint(2, 4)),
                                "--hop", hop, "--replace-settings", fault=fault)
        log.info("soak run %d: fault %s, hop %s, %d files: exit %d", n, fault, hop, files, status)
        assert status in (0, 1, -9), stderr   # 1: a run whose only work was the missing file (all transient)
        assert_consistent(out)
    status, _, stderr = tag(manifest, out, checkpoints, "final", "--hop", hop, "--replace-settings")
    assert status in (0, 1), stderr   # 1: everything else was committed already; only the missing file was left
    uris = {line for line in manifest.read_text().splitlines()}
    assert_consistent(out, uris)
    reference = tmp_path / "reference"
    status, _, stderr = tag(manifest, reference, checkpoints, "ref", "--hop", hop)
    assert status == 0, stderr
    assert_same_results(out, reference)

"""OUTPUT's single-writer lease (pipeline/store/lease.py) on a local folder and on a real S3-protocol
server (moto on loopback): a held lease refuses a second run, an expired one is taken over, of racing runs
exactly one wins, renewal keeps a lease alive."""

from __future__ import annotations

import json
import threading
import time
import uuid

import fsspec
import pytest

from pipeline.store.lease import Lease, LeaseHeld, LeaseLost
from tests.s3 import MotoS3


@pytest.fixture(scope="module")
def moto():
    with MotoS3() as server:
        yield server


def _output(store: str, request) -> str:
    """A fresh OUTPUT: a temp folder, or a new bucket on the module's moto server."""
    if store == "local":
        return str(request.getfixturevalue("tmp_path") / "out")
    moto = request.getfixturevalue("moto")
    moto.use(request.getfixturevalue("monkeypatch"), request.getfixturevalue("tmp_path") / "cache")
    bucket = f"lease-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}/out"


def _lease_object(output: str, epoch: int) -> dict:
    fs, root = fsspec.core.url_to_fs(output)
    return json.loads(fs.cat_file(f"{root}/_lease/{epoch:010d}.json"))


@pytest.mark.parametrize("store", ["local", "s3"])
def test_second_run_is_refused_until_the_first_releases(store, request):
    output = _output(store, request)
    first = Lease(output, "20260101-a", ttl_s=30)
    first.acquire()
    with pytest.raises(LeaseHeld) as held:
        Lease(output, "20260101-b", purpose="maintain").acquire()
    assert held.value.holder["run_id"] == "20260101-a" and held.value.holder["purpose"] == "tag"
    message = str(held.value)
    assert "held by run 20260101-a" in message and f"pid {held.value.holder['pid']}" in message
    assert "lease expires" in message and output in message
    first.check()
    epoch = first.epoch
    first.release()
    assert _lease_object(output, epoch)["released"]

    with Lease(output, "20260101-b", purpose="maintain", ttl_s=30) as second:
        assert second.epoch == epoch + 1
        second.check()
    assert _lease_object(output, epoch + 1)["released"]


def test_expired_lease_is_taken_over_and_the_stalled_run_cannot_commit(tmp_path):
    output = str(tmp_path / "out")
    stalled = Lease(output, "run-stalled", ttl_s=0.3, renew_every_s=60)   # never renews in time
    stalled.acquire()
    with pytest.raises(LeaseHeld):
        Lease(output, "run-next").acquire()
    time.sleep(0.4)
    with Lease(output, "run-next", ttl_s=30) as taker:
        assert taker.epoch == stalled.epoch + 1
        with pytest.raises(LeaseLost, match="run run-next .* took the lease over"):
            stalled.check()
        stalled.release()   # lost: must not mark anything released
        assert not _lease_object(output, taker.epoch)["released"]
        taker.check()


def test_unrenewed_lease_fails_check(tmp_path):
    lease = Lease(str(tmp_path / "out"), "run-a", ttl_s=0.2, renew_every_s=60)
    lease.acquire()
    lease.check()
    time.sleep(0.3)
    with pytest.raises(LeaseLost, match="not renewed since"):
        lease.check()
    lease.release()


def test_hand_written_expired_lease_is_taken_over_and_old_epochs_dropped(tmp_path):
    folder = tmp_path / "out" / "_lease"
    folder.mkdir(parents=True)
    for epoch in (40, 41):
        (folder / f"{epoch:010d}.json").write_text(json.dumps({
            "run_id": "dead", "host": "h", "pid": 1, "acquired_at": 1.0, "renewed_at": 1.0, "expires_at": 2.0,
            "released": False, "purpose": "tag"}))
    with Lease(str(tmp_path / "out"), "run-a", ttl_s=30) as lease:
        assert lease.epoch == 42
    assert sorted(p.name for p in folder.iterdir()) == ["0000000041.json", "0000000042.json"]


def _race(output: str, runs: int = 8) -> tuple[list[Lease], list[LeaseHeld]]:
    leases = [Lease(output, f"racer-{i}", ttl_s=30) for i in range(runs)]
    start = threading.Barrier(runs)
    won, refused = [], []

    def run(lease: Lease) -> None:
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld as e:
            refused.append(e)

    threads = [threading.Thread(target=run, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


@pytest.mark.parametrize("store", ["local", "s3"])
def test_racing_runs_exactly_one_wins(store, request):
    for _ in range(5):   # several fresh OUTPUTs: one round could leave no race to lose
        output = _output(store, request)
        won, refused = _race(output)
        assert len(won) == 1 and len(refused) == 7, [lease.run_id for lease in won]
        assert {e.holder.get("run_id") for e in refused} == {won[0].run_id}
        won[0].check()
        won[0].release()


def test_renewal_keeps_the_lease(tmp_path):
    output = str(tmp_path / "out")
    with Lease(output, "run-a", ttl_s=1.0, renew_every_s=0.2) as lease:
        time.sleep(3.0)
        with pytest.raises(LeaseHeld, match="run-a"):
            Lease(output, "run-b").acquire()
        lease.check()
        body = _lease_object(output, lease.epoch)
        assert body["renewed_at"] > body["acquired_at"] + 2.5


def test_store_without_atomic_create_warns_once_and_still_refuses(caplog):
    output = f"memory://lease-{uuid.uuid4().hex[:8]}/out"
    with caplog.at_level("WARNING", logger="pipeline.store.lease"):
        with Lease(output, "run-a", ttl_s=30):
            with pytest.raises(LeaseHeld, match="run-a"):
                Lease(output, "run-b").acquire()
        with Lease(output, "run-b", ttl_s=30) as second:
            assert second.epoch == 2
    assert sum("no atomic create" in r.getMessage() for r in caplog.records) <= 1


def test_a_holder_killed_on_this_host_is_taken_over_at_once(tmp_path):
    """A run killed on this host (its pid gone) leaves a live-looking lease: the next run need not wait."""
    import subprocess
    import sys

    out = str(tmp_path / "out")
    code = f"from pipeline.store.lease import Lease; Lease({out!r}, 'killed', ttl_s=600).acquire()"
    subprocess.run([sys.executable, "-c", code], check=True)   # exits without releasing
    with Lease(out, "next") as lease:
        assert lease.epoch == 2

"""One writer per OUTPUT: a lease under OUTPUT/_lease/, held by the run that tags or maintains it.

The lease is a series of numbered JSON objects, `_lease/NNNNNNNNNN.json` (an epoch number); the highest
is the current one. A run takes epoch N+1 with an atomic create-if-absent once epoch N is released or
expired, so of the runs racing for an epoch exactly one wins. The holder rewrites its own object every
`renew_every_s` to push `expires_at` forward; a run that stalls past expiry loses the lease to the next
one, and `check()`, called right before each commit, tells it so. Times are unix seconds on the writer's
clock: the hosts' clocks must agree to well within `ttl_s`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from datetime import datetime, timezone

import fsspec

from pipeline.store.writer import OutputError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{10})\.json$")
_warned: set[str] = set()   # stores already warned about for having no atomic create


class LeaseError(Exception):
    """OUTPUT's single-writer lease could not be taken or kept."""


class LeaseHeld(LeaseError):
    """Another run holds OUTPUT's lease; `holder` is its lease object ({} if unreadable)."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


class LeaseLost(LeaseError):
    """This run's lease was taken over or expired unrenewed: it must not commit."""


def create_exclusive(fs, path: str, data: bytes) -> bool:
    """Write `data` at `path` only if nothing is there (atomically where the store allows it); False if
    something already is."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"file", "local"}:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    if protocols & {"s3", "s3a"}:
        bucket, key, _ = fs.split_path(path)
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except OSError as e:   # s3fs turns 412 into FileExistsError, not 409 (a concurrent conditional put)
            status = (getattr(e.__cause__, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(e, FileExistsError) or status in (409, 412):
                return False
            raise
    if protocols & {"gs", "gcs"}:   # gcsfs >= 2024.12 sends ifGenerationMatch=0, a 412 is FileExistsError
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
    if not protocols & _warned:
        _warned.update(protocols)
        log.warning("store %s gives no atomic create: two runs started within the same second could both "
                    "take the lease on an OUTPUT", "/".join(sorted(protocols)))
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def _utc(t) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if t else "?"


def _who(h: dict) -> str:
    if not h:
        return "another run (its lease object is unreadable)"
    return f"run {h.get('run_id')} (host {h.get('host')}, pid {h.get('pid')}, purpose {h.get('purpose')})"


def _dead_here(h: dict) -> bool:
    """Whether the holder ran on this host and its process is gone (a killed run: no need to wait out its
    lease). Holders on other hosts are judged by their expiry only."""
    if h.get("host") != socket.gethostname() or not isinstance(h.get("pid"), int):
        return False
    try:
        os.kill(h["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Lease:
    """OUTPUT's single-writer lease for one run: `with Lease(output, run_id) as lease: ... lease.check()`.

    ttl_s: seconds the lease lives without renewal; renew_every_s: seconds between renewals (ttl_s/10 if
    None); purpose: what the run does with OUTPUT ("tag", "maintain"), for the message another run gets."""

    def __init__(self, output: str, run_id: str, purpose: str = "tag", ttl_s: float = 300.0,
                 renew_every_s: float | None = None):
        self.output, self.run_id, self.purpose, self.ttl_s = output, run_id, purpose, ttl_s
        self.renew_every_s = ttl_s / 10 if renew_every_s is None else renew_every_s
        self.fs, root = fsspec.core.url_to_fs(output)
        self.dir = f"{root.rstrip('/')}/_lease"
        self.epoch: int | None = None   # the epoch this run holds, once acquired
        self._body: dict = {}           # what this run last wrote to its epoch's object
        self._lost: str | None = None   # why the lease was lost, once it is
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        try:
            self.acquire()
        except OSError as e:   # OUTPUT cannot be written: an output error, not a lease held by another run
            raise OutputError(f"cannot take the lease on {self.output}: {e}") from e
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease and start renewing it, or raise LeaseHeld naming the run that has it."""
        top = max(self._epochs(), default=0)
        holder = self._read(top) if top else None
        if holder and not holder.get("released") and holder.get("expires_at", 0) >= time.time():
            if not _dead_here(holder):
                raise LeaseHeld(self._held(holder), holder)
            log.warning("%s held the lease on %s but is no longer running on this host: taken as expired",
                        _who(holder), self.output)
        if top and holder is None:
            log.warning("lease object %s is unreadable: taken as expired", self._path(top))
        now = time.time()
        body = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "acquired_at": now,
                "renewed_at": now, "expires_at": now + self.ttl_s, "released": False, "purpose": self.purpose}
        # a retried put that had succeeded finds its own object: that is a win, not a race lost
        if not create_exclusive(self.fs, self._path(top + 1), json.dumps(body).encode()) and \
                (winner := self._read(top + 1) or {}) != body:
            raise LeaseHeld(self._held(winner), winner)
        newest = max(self._epochs(), default=top + 1)
        if newest != top + 1:   # our listing was stale (older epochs deleted since): a later one is current
            holder = self._read(newest) or {}
            raise LeaseHeld(self._held(holder), holder)
        self.epoch, self._body, self._lost = top + 1, body, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        log.info("run %s took the lease on %s (epoch %d)", self.run_id, self.output, self.epoch)

    def check(self) -> None:
        """Raise LeaseLost unless this run still holds the lease (one list call); call before each commit."""
        if self.epoch is None:
            raise LeaseError(f"run {self.run_id} holds no lease on {self.output}")
        if self._lost is None:
            newest = max(self._epochs(), default=None)
            if newest != self.epoch:
                self._lost = self._taken_by(newest)
            elif self._body["expires_at"] < time.time():
                self._lost = (f"not renewed since {_utc(self._body['renewed_at'])}, it expired at "
                              f"{_utc(self._body['expires_at'])}")
        if self._lost is not None:
            raise LeaseLost(f"run {self.run_id} lost its lease on OUTPUT {self.output} (epoch {self.epoch}): "
                            f"{self._lost}")

    def release(self) -> None:
        """Stop renewing; mark the lease released if it is still ours, and delete epochs below N-1 (best
        effort)."""
        if self.epoch is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            epochs = self._epochs()
            if max(epochs, default=None) == self.epoch:
                body = {**self._body, "renewed_at": time.time(), "released": True}
                self.fs.pipe_file(self._path(self.epoch), json.dumps(body).encode())
                for n in sorted(n for n in epochs if n < self.epoch - 1):
                    self.fs.rm_file(epochs[n])
                log.info("run %s released its lease on %s (epoch %d)", self.run_id, self.output, self.epoch)
        except OSError:
            log.warning("releasing the lease on %s (epoch %d) failed: it expires in at most %g s", self.output,
                        self.epoch, self.ttl_s, exc_info=True)
        self.epoch = None

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                newest = max(self._epochs(), default=None)
                if newest != self.epoch:   # we stalled past expiry and another run took over
                    self._lost = self._taken_by(newest)
                    log.error("run %s lost its lease on %s: %s", self.run_id, self.output, self._lost)
                    return
                now = time.time()
                body = {**self._body, "renewed_at": now, "expires_at": now + self.ttl_s}
                self.fs.pipe_file(self._path(self.epoch), json.dumps(body).encode())
                self._body = body
            except OSError:   # retried at the next tick; check() refuses commits once the lease expires
                log.warning("renewing the lease on %s failed", self.output, exc_info=True)

    def _epochs(self) -> dict[int, str]:
        """{epoch: path} of the lease objects, listed fresh (fsspec caches listings)."""
        self.fs.invalidate_cache(self.dir)
        try:
            paths = self.fs.ls(self.dir, detail=False)
        except FileNotFoundError:
            return {}
        return {int(m[1]): p for p in paths if (m := _NAME.match(p.rstrip("/").rsplit("/", 1)[-1]))}

    def _read(self, n: int) -> dict | None:
        """Epoch n's lease object; None if absent, or unreadable for 1 s (a local create not yet written)."""
        for _ in range(20):
            try:
                return json.loads(self.fs.cat_file(self._path(n)))
            except FileNotFoundError:
                return None
            except ValueError:
                time.sleep(0.05)
        return None

    def _path(self, n: int) -> str:
        return f"{self.dir}/{n:010d}.json"

    def _held(self, h: dict) -> str:
        return (f"OUTPUT {self.output} is held by {_who(h)} since {_utc(h.get('acquired_at'))}, lease expires "
                f"{_utc(h.get('expires_at'))} unless renewed; wait for it, or if that run is dead, for its lease "
                f"to expire")

    def _taken_by(self, newest: int | None) -> str:
        if newest is None or newest < self.epoch:
            return f"its lease object {self._path(self.epoch)} is gone"
        return f"{_who(self._read(newest) or {})} took the lease over (epoch {newest})"

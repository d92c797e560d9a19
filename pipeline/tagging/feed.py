"""The run's one Ray Data execution takes its input files from a feed that the driver's listing fills.

A run lists its input while it processes it (a listing of 100M keys is held nowhere) and starts its
model actors once: the listing thread (`Listing`) puts new or changed files into a `FileFeed` actor, and
the dataset's source (`FeedSource`) is a fixed number of long featurize read tasks, each taking files
from the feed `per_take` at a time and yielding their window blocks until the feed is closed and empty.
Ray Data's backpressure on those tasks' outputs is what paces them; the feed's bound on queued files
paces the listing.

Ray Data's no-progress guard cannot tell a slow listing (the feed empty while it skips millions of
unchanged files) from a stuck stage, so a run with a feed watches for stalls itself (`Watchdog`):
`Listing.activity` says when waiting is the listing's doing. The feed also remembers the files taken and
not yet acknowledged, so that those a lost node held are processed again (`FileFeed.lost`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Callable, Iterable

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

log = logging.getLogger(__name__)

PUT_ROWS = 1_000   # files per put: the feed's bound on queued files holds to this


@ray.remote(num_cpus=0, max_restarts=0)
class FileFeed:
    """Files listed and not yet taken, at most `queue_files` (+ PUT_ROWS), and the files taken whose rows
    the driver has not reported (`done`): those a featurize task on a lost node took are `lost()` at the
    end, for the run to process again. Async: `put` waits for room and `take` for files without blocking
    each other."""

    def __init__(self, queue_files: int):
        self.queue_files = queue_files
        self.queue: deque[pa.Table] = deque()
        self.queued = self.taken = 0
        self.closed = False
        self.changed = asyncio.Condition()
        self.in_flight: dict[str, dict] = {}   # clip_id -> FILE_SCHEMA row, taken and not done
        self.schema: pa.Schema | None = None

    async def put(self, files: pa.Table) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.queued < self.queue_files)
            self.queue.append(files)
            self.queued += len(files)
            self.schema = files.schema
            self.changed.notify_all()

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    async def take(self, n: int) -> pa.Table | None:
        """Up to `n` files, waiting for some; None once the feed is closed and empty."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.queued or self.closed)
            if not self.queued:
                return None
            parts, got = [], 0
            while got < n and self.queue:
                head = self.queue.popleft()
                part = head.slice(0, n - got)
                if len(part) < len(head):
                    self.queue.appendleft(head.slice(len(part)))
                parts.append(part)
                got += len(part)
            self.queued -= got
            self.taken += got
            self.changed.notify_all()
            files = pa.concat_tables(parts)
            self.in_flight.update(zip(files.column("clip_id").to_pylist(), files.to_pylist()))
            return files

    async def done(self, clip_ids: list[str]) -> None:
        """These files' rows reached the driver (or they were handed back to another lane)."""
        for clip_id in clip_ids:
            self.in_flight.pop(clip_id, None)

    async def lost(self) -> pa.Table | None:
        """Files taken whose rows never came: their featurize task's node was lost mid-run."""
        return pa.Table.from_pylist(list(self.in_flight.values()), self.schema) if self.in_flight else None

    def counts(self) -> tuple[int, int]:
        """(files queued, files taken so far)."""
        return self.queued, self.taken


class FeedSource(Datasource):
    """A Ray Data source of window blocks: `tasks` read tasks, each taking `per_take` files at a time from
    `feed` and running `featurize` (a `Featurize`) over them, until the feed is closed and empty."""

    def __init__(self, feed, featurize: Callable[[pa.Table], Iterable[pa.Table]], tasks: int, per_take: int):
        self.feed, self.featurize, self.tasks, self.per_take = feed, featurize, tasks, per_take

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        feed, featurize, per_take = self.feed, self.featurize, self.per_take

        def read():
            while (files := ray.get(feed.take.remote(per_take))) is not None:
                yield from featurize(files)

        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(read, meta) for _ in range(self.tasks)]


class Listing(threading.Thread):
    """The driver's listing thread: puts the tables of `chunks` (new or changed files, already filtered)
    into `feed`, then closes it. Its error, if any, is raised again by `result()`."""

    def __init__(self, feed, chunks: Iterable[pa.Table]):
        super().__init__(name="listing", daemon=True)
        self.feed, self.chunks = feed, chunks
        self.fed = 0                     # files put into the feed
        self.first = threading.Event()   # set once a file is in the feed, or the listing ended
        self.error: BaseException | None = None
        self._done = False

    def run(self) -> None:
        try:
            for files in self.chunks:
                for start in range(0, len(files), PUT_ROWS):
                    part = files.slice(start, PUT_ROWS)
                    ray.get(self.feed.put.remote(part))
                    self.fed += len(part)
                    self.first.set()
        except BaseException as e:  # reported by result(); the files fed so far are still processed
            self.error = e
        finally:
            self._done = True
            try:
                ray.get(self.feed.close.remote())
            finally:
                self.first.set()

    def activity(self):
        """None while the feed is empty and the listing still runs (waiting is then the listing's doing,
        not a stall); else the count of files taken from the feed, which grows while featurize works."""
        queued, taken = ray.get(self.feed.counts.remote())
        return None if not self._done and not queued else taken

    def result(self) -> int:
        """The files fed; the listing's error, if it failed."""
        self.join()
        if self.error is not None:
            raise self.error
        return self.fed


class Watchdog(threading.Thread):
    """Interrupts the driver's main thread (a KeyboardInterrupt there; `stalled` says why) when for
    `timeout_s` no result arrived (`alive()`) and `activity()` neither changed nor was None; -1: never."""

    def __init__(self, timeout_s: float, activity: Callable[[], object], check_s: float = 1.0):
        super().__init__(name="watchdog", daemon=True)
        self.timeout_s, self.activity, self.check_s = timeout_s, activity, check_s
        self.last = time.monotonic()
        self.stalled = False
        self._halt = threading.Event()

    def alive(self) -> None:
        self.last = time.monotonic()

    def run(self) -> None:
        import _thread

        seen = object()
        while self.timeout_s > 0 and not self._halt.wait(self.check_s):
            now = self.activity()
            if now is None or now != seen:
                seen = now
                self.alive()
            elif time.monotonic() - self.last > self.timeout_s:
                self.stalled = True
                _thread.interrupt_main()
                return

    def stop(self) -> None:
        self._halt.set()

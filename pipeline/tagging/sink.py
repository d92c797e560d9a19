"""Stages 6-7 on the workers: window rows (after both models) -> clips and segments part files.

`WriteResults` runs in Ray Data actors after the CLAP actors (a small pool: pipeline/tagging/job.py).
It aggregates the windows of every file that is whole in its batch (`aggregate.ClipAggregator`), writes
their segments part, then their clips part (a complete clips part never names a clip whose windows are
not in a complete segments part), and returns one small row per batch to the driver: the part files
written, the batch's summary counts, and two rare kinds of leftovers as Arrow IPC bytes:
- the running state of files whose windows were split across batches (max of scores, sums of embeddings,
  segment indices seen: ~14 KB, whatever the number of windows); their windows are written here too, in
  a part of their own per file ("pieces"), and the driver merges the states and writes the clip row once
  the file is whole, then commits it with its pieces;
- files the long-file lane must take (error LONG_FILE), handed back to the driver.

So the driver receives ~1 row per batch instead of every window's 7 KB of scores and embeddings, and its
CPU stays flat as workers are added (benchmarks/driver.py measures both). Part names are derived from the
batch's (clip_id, segment_index) content: a retried batch rewrites the same part instead of adding a copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.tagging.aggregate import ClipAggregator, ZeroShot, clips_table
from pipeline.audio.decode import LONG_FILE
from pipeline.tagging.summary import RunSummary
from pipeline.store.writer import PartWriter

log = logging.getLogger(__name__)

SINK_SCHEMA = pa.schema([
    ("segments_parts", pa.list_(pa.string())), ("clips_parts", pa.list_(pa.string())),
    ("clip_ids", pa.list_(pa.string())),        # the clip rows in clips_parts
    ("pieces", pa.list_(pa.struct([("clip_id", pa.string()), ("part", pa.string())]))),  # split files' windows
    ("clip_rows", pa.int64()), ("counts", pa.string()),   # RunSummary.counts() as JSON
    ("leftover", pa.binary()), ("handed_back", pa.binary()),
])


@dataclass(frozen=True)
class SinkConfig:
    """Where and how a run writes: OUTPUT, run id, label names, top-k, the tables' schemas, the run metadata
    stored in every part file, and the zero-shot label set (embedded once on the driver)."""

    output: str
    run_id: str
    label_names: tuple[str, ...]
    top_k: int
    segments_schema: pa.Schema
    clips_schema: pa.Schema
    metadata: str                     # run metadata, JSON
    zero_shot: ZeroShot | None = None
    parts_dir: str = ""               # under each table's root, above the run's folder (a replacement's staging)

    def writers(self, rows_per_file: int = 1 << 62) -> tuple[PartWriter, PartWriter]:
        meta = json.loads(self.metadata)
        return tuple(PartWriter(self.output, "/".join(filter(None, (table, self.parts_dir))), self.run_id, schema,
                                meta, rows_per_file)
                     for table, schema in (("segments", self.segments_schema), ("clips", self.clips_schema)))

    def aggregator(self) -> ClipAggregator:
        return ClipAggregator(list(self.label_names), self.top_k, self.run_id, self.zero_shot)


class WriteResults:
    """Callable for `map_batches(batch_format="pyarrow")`: window rows -> one SINK_SCHEMA row."""

    def __init__(self, config: SinkConfig):
        self.config = config

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch, handed_back = split_long(batch)
        aggregator = self.config.aggregator()
        segments, clips = aggregator.add(batch)
        leftover = aggregator.take_partials()   # files not whole here: their state, for the driver
        summary = RunSummary(self.config.run_id)
        for clip in clips:
            summary.count(clip)
        segment_parts, clip_parts, pieces = [], [], []
        if clips or len(segments):
            name = part_name(batch)
            split = leftover.column("clip_id").to_pylist() if leftover is not None else []
            in_split = pc.is_in(segments.column("clip_id"), pa.array(split, pa.string()))
            seg_writer, clip_writer = self.config.writers()
            seg_writer.write(segments.filter(pc.invert(in_split)))
            seg_writer.flush(name)             # segments first
            clip_writer.write(clips_table(clips, clip_writer.schema))
            clip_writer.flush(name)
            segment_parts, clip_parts = list(seg_writer.files), list(clip_writer.files)
            for i, clip_id in enumerate(split):   # a part per split file: committed when the file is whole
                seg_writer.write(segments.filter(pc.equal(segments.column("clip_id"), clip_id)))
                written = len(seg_writer.files)
                seg_writer.flush(f"{name}-{i}")
                pieces += [{"clip_id": clip_id, "part": p} for p in seg_writer.files[written:]]
        row = {"segments_parts": segment_parts, "clips_parts": clip_parts,
               "clip_ids": [clip["clip_id"] for clip in clips], "pieces": pieces, "clip_rows": len(clips),
               "counts": json.dumps(summary.counts()), "leftover": to_ipc(leftover),
               "handed_back": to_ipc(handed_back)}
        return pa.Table.from_pylist([row], schema=SINK_SCHEMA)


class Collector:
    """The driver's side of the sink: collects SINK_SCHEMA rows' counts into `summary` and their part
    files into what is ready to commit, finishes the files whose windows were split across batches
    (merges their states, writes their clip rows), and keeps the files handed back to the long-file lane.

    What `take` hands to a commit is whole: the parts of files that were whole in a batch, and each split
    file's clip row with all its pieces once its last window arrived; a split file still in flight holds
    back only its own pieces. Work per row, not per window or file."""

    def __init__(self, config: SinkConfig, summary: RunSummary, rows_per_file: int = 20_000):
        self.clips = config.writers(rows_per_file)[1]   # the clip rows of split files, once whole
        self.aggregator = config.aggregator()
        self.summary = summary
        self.clip_rows = 0                     # clip rows received or written, over the run
        self.handed_back: list[pa.Table] = []  # window-schema rows of files too long for the lane
        self._ready = {"segments": [], "clips": []}
        self._ready_ids: list[str] = []
        self._pieces: dict[str, list[str]] = {}   # split files' window parts, by clip_id

    def add(self, batch: pa.Table) -> list[str]:
        """Take SINK_SCHEMA rows; returns the clip_ids of the files that left the pipeline with them
        (their clip rows are ready, or they were handed back to the long-file lane)."""
        left = []
        for row in batch.to_pylist():
            left += row["clip_ids"]
            self._ready["segments"] += row["segments_parts"]
            self._ready["clips"] += row["clips_parts"]
            self._ready_ids += row["clip_ids"]
            self.clip_rows += row["clip_rows"]
            for piece in row["pieces"]:
                self._pieces.setdefault(piece["clip_id"], []).append(piece["part"])
            self.summary.merge(json.loads(row["counts"]))
            if row["handed_back"]:
                self.handed_back.append(from_ipc(row["handed_back"]))
                left += self.handed_back[-1].column("clip_id").to_pylist()
            if row["leftover"]:
                clips = self.aggregator.add_partials(from_ipc(row["leftover"]))
                if clips:
                    self.clips.write(clips_table(clips, self.clips.schema))
                    if self.clips.full:
                        self.clips.flush()
                for clip in clips:
                    self._ready["segments"] += self._pieces.pop(clip["clip_id"])
                    self._ready_ids.append(clip["clip_id"])
                    left.append(clip["clip_id"])
                    self.summary.count(clip)
                self.clip_rows += len(clips)
        return left

    def forget(self, clip_ids: list[str]) -> None:
        """Drop what arrived of files that are processed again (their featurize task's node was lost):
        their pieces are never committed, their running state starts afresh."""
        for clip_id in clip_ids:
            self._pieces.pop(clip_id, None)
        self.aggregator.forget(clip_ids)

    @property
    def ready(self) -> int:
        """Files whose rows `take` would hand over now."""
        return len(self._ready_ids)

    def take(self) -> tuple[dict[str, list[str]], pa.Array]:
        """The part files ready to commit, by table, and the clip_ids of their clip rows; forgotten here."""
        self.clips.flush()
        parts = {"segments": self._ready["segments"], "clips": self._ready["clips"] + self.clips.files}
        ids = pa.array(self._ready_ids, pa.string())
        self._ready, self._ready_ids, self.clips.files = {"segments": [], "clips": []}, [], []
        return parts, ids

    def finish(self) -> tuple[dict[str, list[str]], pa.Array]:
        """`take`, once every file is whole."""
        if self.aggregator.pending or self._pieces:
            raise RuntimeError(f"{max(self.aggregator.pending, len(self._pieces))} files never received all "
                               "their windows")
        return self.take()


def part_name(batch: pa.Table) -> str:
    """A part name fixed by the batch's windows: the same batch (a retried task) gives the same name."""
    keys = zip(batch.column("clip_id").to_pylist(), batch.column("segment_index").to_pylist())
    digest = hashlib.sha256("\n".join(f"{c}/{i}" for c, i in keys).encode())
    return f"part-{digest.hexdigest()[:20]}"


def split_long(batch: pa.Table) -> tuple[pa.Table, pa.Table | None]:
    """(rows to aggregate, rows of the files the lane handed back as too long for it)."""
    longer = pc.fill_null(pc.equal(batch.column("error"), LONG_FILE), False)
    if not pc.any(longer).as_py():
        return batch, None
    return batch.filter(pc.invert(longer)), batch.filter(longer)


def to_ipc(table: pa.Table | None) -> bytes | None:
    if table is None or not len(table):
        return None
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def from_ipc(data: bytes) -> pa.Table:
    with pa.ipc.open_stream(io.BytesIO(data)) as reader:
        return reader.read_all()

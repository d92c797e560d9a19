"""Stages 2-4 as one Ray Data CPU stage: file rows -> window rows with AST and CLAP features.

Each file is read once and decoded once, in a child process (pipeline/tagging/isolation.py) so that a
decoder that hangs or crashes on one hostile file cannot take the worker down (files on object storage
or HTTP are read by the worker, ahead of their turn: storage.ReadAhead); its windows are planned, and
features are computed window by window and emitted in blocks of at most `windows_per_block` rows, so
an hour-long file never puts its whole feature matrix in one batch. A file that is not usable audio
becomes one row with status "error" and zero windows. Features travel as float32 byte buffers (binary columns).

`features_on="gpu"` leaves the resampling and the features to the model actors (on their device:
pipeline/audio/resample_device.py, features_device.py): the child only decodes and downmixes, and rows
carry instead the slice of the mono source waveform that the window's two resamples read (`wave`, float32
at the file's rate, zeros past the file's ends), where it starts (`wave_first`, in source samples) and the
file's length (`source_frames`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.arrow import blobs_from_buffer, blobs_from_rows
from pipeline.audio.decode import Audio, DecodeConfig, DecodeError
from pipeline.audio.features_ast import AstFbank, AstFbankConfig
from pipeline.audio.features_clap import ClapMel, ClapMelConfig
from pipeline.audio.resample_device import Span, slice_bounds, span
from pipeline.tagging.isolation import shared_decoder
from pipeline.audio.storage import READ_AHEAD_BYTES, ReadAhead
from pipeline.audio.windows import Window, WindowConfig, plan_windows, sample_span

log = logging.getLogger(__name__)

_META_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("uri", pa.string()), ("size_bytes", pa.int64()),
    ("modified", pa.string()), ("etag", pa.string()),
    ("status", pa.string()), ("error", pa.string()), ("error_detail", pa.string()), ("warning", pa.string()),
    ("duration_s", pa.float64()), ("sample_rate", pa.int32()), ("channels", pa.int32()),
    ("decoder", pa.string()), ("num_segments", pa.int32()),
    ("segment_index", pa.int32()), ("start_s", pa.float64()), ("end_s", pa.float64()),
])
FEATURES_ON = ("cpu", "gpu")
# what the model actors read, by where features are computed: the features, or the waveforms
MODEL_INPUTS = {
    "cpu": pa.schema([("ast_features", pa.binary()), ("clap_features", pa.binary())]),
    "gpu": pa.schema([("wave", pa.binary()), ("wave_first", pa.int64()), ("source_frames", pa.int64())]),
}
WINDOW_SCHEMAS = {on: pa.schema(list(_META_SCHEMA) + list(inputs)) for on, inputs in MODEL_INPUTS.items()}


@dataclass(frozen=True)
class FeaturizeConfig:
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    windows: WindowConfig = field(default_factory=WindowConfig)
    ast: AstFbankConfig = field(default_factory=AstFbankConfig)
    clap: ClapMelConfig = field(default_factory=ClapMelConfig)
    windows_per_block: int = 16
    features_on: str = "cpu"   # "cpu": here; "gpu": in the model actors, on their device (FEATURES_ON)

    def __post_init__(self):
        if self.features_on not in FEATURES_ON:
            raise ValueError(f"features_on must be one of {FEATURES_ON}, got {self.features_on!r}")

    @property
    def row_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of one window's (AST, CLAP) features (features_on="cpu")."""
        return ((self.ast.max_length, self.ast.num_mel_bins),
                (self.clap.channels, self.clap.num_frames, self.clap.num_mel_bins))

    def spans(self, rate: int, frames: int, start_s: float) -> tuple[Span, Span]:
        """The source samples the (AST, CLAP) resamples of the window at `start_s` read (features_on="gpu")."""
        return (span(rate, self.ast.sample_rate, frames, start_s, self.windows.ast_window_s),
                span(rate, self.clap.sample_rate, frames, start_s, self.windows.clap_window_s))

    @property
    def row_floats(self) -> int:
        """float32 values of one window's model input: its features, or (features_on="gpu") its source
        slice, sized for a source at up to 48 kHz (higher rates ship proportionally more)."""
        if self.features_on == "gpu":
            first, end = slice_bounds(list(self.spans(48_000, 1 << 40, 0.0)))
            return end - first
        return sum(int(np.prod(shape)) for shape in self.row_shapes)

    @property
    def block_bytes(self) -> int:
        """Bytes of model input in one full window block (float32)."""
        return self.windows_per_block * 4 * self.row_floats


# Memory a featurize task holds, per second of audio in its file: the waveforms at the model rates (with
# features_on="gpu", the source-rate mono instead: less for sources up to 64 kHz) in the decoder child
# and, in the worker, in the shared buffer or (files too long for it) received over the pipe (2 x 4 B per
# sample); the child's mono source (4 B at up to 48 kHz); the file's bytes in the worker and
# the child (16-bit stereo 48 kHz PCM). Plus a block of model inputs in numpy, Arrow and the object store,
# and the worker process itself (torch imported; its 32 MiB shared buffer, isolation.SHARED_BYTES).
BYTES_PER_AUDIO_S = 2 * 4 * (16_000 + 48_000) + 4 * 48_000 + 2 * 192_000
TASK_BASE_BYTES = 400 << 20

class _Block:
    """Up to `capacity` window rows being filled: metadata as dicts, the model inputs written in place into
    contiguous float32 arrays that become the Arrow columns' data buffers without a copy: one per model's
    features, or (features_on="gpu") one holding the rows' source slices back to back."""

    def __init__(self, capacity: int, config: FeaturizeConfig):
        self.schema = WINDOW_SCHEMAS[config.features_on]
        self.meta: list[dict] = []
        self.valid: list[bool] = []
        self.filled = 0  # model input rows in use (rows of windows; error rows have none)
        if config.features_on == "gpu":
            self.wave = np.empty(capacity * config.row_floats, np.float32)  # grows for rates above 48 kHz
            self.wave_ends: list[int] = []
            self.wave_first: list[int] = []
            self.source_frames: list[int] = []
        else:
            ast_shape, clap_shape = config.row_shapes
            self.ast = np.empty((capacity,) + ast_shape, np.float32)
            self.clap = np.empty((capacity,) + clap_shape, np.float32)

    def __len__(self) -> int:
        return len(self.meta)

    def wave_row(self, floats: int) -> np.ndarray:
        """The next source slice's place in the block's buffer, `floats` long."""
        start = self.wave_ends[-1] if self.wave_ends else 0
        if start + floats > len(self.wave):
            grown = np.empty(max(2 * len(self.wave), start + floats), np.float32)
            grown[:start] = self.wave[:start]
            self.wave = grown
        self.wave_ends.append(start + floats)
        return self.wave[start:start + floats]

    def table(self) -> pa.Table:
        valid = np.array(self.valid, dtype=bool)
        meta = pa.Table.from_pylist(self.meta, schema=_META_SCHEMA)
        if "wave" in self.schema.names:
            ends = np.zeros(len(valid), np.int64)
            ends[valid] = self.wave_ends
            inputs = [blobs_from_buffer(self.wave[:ends.max(initial=0)], np.maximum.accumulate(ends), valid)]
            for values in (self.wave_first, self.source_frames):
                column = np.zeros(len(valid), np.int64)
                column[valid] = values
                inputs.append(pa.array(column, mask=~valid))
        else:
            inputs = [blobs_from_rows(self.ast[:self.filled], valid), blobs_from_rows(self.clap[:self.filled], valid)]
        return pa.Table.from_arrays(meta.columns + inputs, schema=self.schema)


def task_memory_bytes(config: FeaturizeConfig, seconds: float) -> int:
    """Ray `memory` to reserve for a featurize task whose files are at most `seconds` long."""
    return int(seconds * BYTES_PER_AUDIO_S + 3 * config.block_bytes + TASK_BASE_BYTES
               + READ_AHEAD_BYTES)


class Featurize:
    """Callable for `map_batches(batch_format="pyarrow")`: yields tables of WINDOW_SCHEMAS[config.features_on].

    `lane_s`: files longer than this become rows with error LONG_FILE instead of being featurized, so a
    task never holds more than task_memory_bytes(config, lane_s); the job runs those in a second lane.
    `read_ahead_bytes`: files on object storage or HTTP are read ahead of the one being featurized, up to
    this many bytes (storage.ReadAhead; 0: each is read when its turn comes). Not a setting of the
    results, so not in FeaturizeConfig (whose fields are part of the run's settings hash).
    """

    def __init__(self, config: FeaturizeConfig, lane_s: float | None = None,
                 read_ahead_bytes: int = READ_AHEAD_BYTES):
        self.config = config
        self.read_ahead_bytes = read_ahead_bytes
        # features_on="gpu": no rates, the child only decodes and downmixes (the actors resample)
        rates = (config.ast.sample_rate, config.clap.sample_rate) if config.features_on == "cpu" else ()
        self._decode_config = DecodeConfig(**{**config.decode.__dict__, "rates": rates, "lane_s": lane_s})
        self._ast = None
        self._clap = None

    def __call__(self, files: pa.Table) -> Iterator[pa.Table]:
        if self._ast is None and self.config.features_on == "cpu":  # built in the worker, not pickled
            self._ast, self._clap = _extractors(self.config.ast, self.config.clap)
        block = self._new_block()
        for file, data in ReadAhead(files.to_pylist(), self.read_ahead_bytes):
            for row, audio, window in self._rows(file, data):
                if window is not None:
                    self._features_into(block, audio, window)
                block.meta.append(row)
                block.valid.append(window is not None)
                if len(block) >= self.config.windows_per_block:
                    yield block.table()
                    block = self._new_block()
        if len(block):
            yield block.table()

    def _new_block(self) -> _Block:
        return _Block(self.config.windows_per_block, self.config)

    def _rows(self, file: dict, data: bytes | DecodeError | None = None,
              ) -> Iterator[tuple[dict, Audio | None, Window | None]]:
        """(metadata row, decoded audio, window) per window of the file; one error row (no audio, no
        window) if it is not usable audio. `data`: the file's bytes or its read's error, from ReadAhead;
        None: the decoder reads the file."""
        try:
            if file.get("listing_error"):
                raise DecodeError(file["listing_error"])
            if isinstance(data, DecodeError):
                raise data
            decoder = shared_decoder(self._decode_config)
            audio = decoder.decode_file(file["uri"], lend=True) if data is None else decoder(data, lend=True)
        except DecodeError as e:
            log.info("%s: %s", file["uri"], e)
            yield ({**file, "status": "error", "error": e.reason, "error_detail": e.detail or None,
                    "num_segments": 0}, None, None)
            return
        windows = plan_windows(audio.duration_s, self.config.windows)
        meta = {**file, "status": "ok", "error": None, "duration_s": audio.duration_s,
                "sample_rate": audio.source_rate, "channels": audio.channels, "decoder": audio.decoder,
                "warning": audio.warning, "num_segments": len(windows)}
        for w in windows:
            yield {**meta, "segment_index": w.index, "start_s": w.start_s, "end_s": w.end_s}, audio, w

    def _features_into(self, block: _Block, audio: Audio, window: Window) -> None:
        i = block.filled
        if self.config.features_on == "gpu":
            self._slice_into(block, audio, window)
        else:
            ast_rate, clap_rate = self.config.ast.sample_rate, self.config.clap.sample_rate
            span16 = sample_span(window.start_s, self.config.windows.ast_window_s, ast_rate)
            span48 = sample_span(window.start_s, self.config.windows.clap_window_s, clap_rate)
            self._ast(audio.waves[ast_rate][span16], out=block.ast[i])
            self._clap.one(audio.waves[clap_rate][span48], out=block.clap[i])
        block.filled += 1

    def _slice_into(self, block: _Block, audio: Audio, window: Window) -> None:
        """The source samples this window's two resamples read, zeros outside the file."""
        mono = audio.waves[audio.source_rate]
        first, end = slice_bounds(list(self.config.spans(audio.source_rate, len(mono), window.start_s)))
        row = block.wave_row(end - first)
        lo, hi = max(first, 0), min(end, len(mono))
        row[:lo - first] = 0.0
        row[lo - first:hi - first] = mono[lo:hi]
        row[hi - first:] = 0.0
        block.wave_first.append(first)
        block.source_frames.append(len(mono))


_EXTRACTORS: dict[tuple, tuple[AstFbank, ClapMel]] = {}


def _extractors(ast: AstFbankConfig, clap: ClapMelConfig) -> tuple[AstFbank, ClapMel]:
    """The worker process's feature extractors for these configs. Ray unpickles the stage afresh for
    every task, which rebuilt both mel banks each time (~1.7 ms of one core per task)."""
    key = (ast, clap)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = (AstFbank(ast), ClapMel(clap))
    return _EXTRACTORS[key]

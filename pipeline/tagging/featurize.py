"""Stages 2-4 as one Ray Data CPU stage: file rows -> window rows with AST and CLAP features.

Each file is read once and decoded once, in a child process (pipeline/tagging/isolation.py) so that a
decoder that hangs or crashes on one hostile file cannot take the worker down (files on object storage
or HTTP are read by the worker, ahead of their turn: storage.ReadAhead); its windows are planned, and
features are computed window by window and emitted in blocks of at most `windows_per_block` rows, so
an hour-long file never puts its whole feature matrix in one batch. A file that is not usable audio
becomes one row with status "error" and zero windows. Features travel as float32 byte buffers (binary columns).

`features_on="gpu"` leaves the features to the model actors (pipeline/audio/features_device.py, on their
device): rows carry each window's waveforms at the two model rates instead, zero-padded to a full window
(`ast_wave`, `clap_wave`), with their real lengths in samples (`ast_samples`, `clap_samples`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.arrow import blobs_from_rows
from pipeline.audio.decode import Audio, DecodeConfig, DecodeError
from pipeline.audio.features_ast import AstFbank, AstFbankConfig
from pipeline.audio.features_clap import ClapMel, ClapMelConfig
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
    "gpu": pa.schema([("ast_wave", pa.binary()), ("ast_samples", pa.int32()),
                      ("clap_wave", pa.binary()), ("clap_samples", pa.int32())]),
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
        """Shapes of one window's (AST, CLAP) model input: features, or waveforms padded to a window."""
        if self.features_on == "gpu":
            return ((sample_span(0.0, self.windows.ast_window_s, self.ast.sample_rate).stop,),
                    (sample_span(0.0, self.windows.clap_window_s, self.clap.sample_rate).stop,))
        return ((self.ast.max_length, self.ast.num_mel_bins),
                (self.clap.channels, self.clap.num_frames, self.clap.num_mel_bins))

    @property
    def block_bytes(self) -> int:
        """Bytes of model input in one full window block (float32)."""
        return self.windows_per_block * 4 * sum(int(np.prod(shape)) for shape in self.row_shapes)


# Memory a featurize task holds, per second of audio in its file: the waveforms at the model rates in the
# decoder child and, in the worker, in the shared buffer or (files too long for it) received over the pipe
# (2 x 4 B per sample); the child's mono source (4 B at up to 48 kHz); the file's bytes in the worker and
# the child (16-bit stereo 48 kHz PCM). Plus a block of features in numpy, Arrow and the object store,
# and the worker process itself (torch imported; its 32 MiB shared buffer, isolation.SHARED_BYTES).
BYTES_PER_AUDIO_S = 2 * 4 * (16_000 + 48_000) + 4 * 48_000 + 2 * 192_000
TASK_BASE_BYTES = 400 << 20

class _Block:
    """Up to `capacity` window rows being filled: metadata as dicts, the model inputs (features, or
    waveforms and their lengths) written in place into one contiguous float32 array per model, which
    becomes the Arrow column's data buffer without a copy."""

    def __init__(self, capacity: int, config: FeaturizeConfig):
        ast_shape, clap_shape = config.row_shapes
        self.schema = WINDOW_SCHEMAS[config.features_on]
        self.meta: list[dict] = []
        self.valid: list[bool] = []
        self.ast = np.empty((capacity,) + ast_shape, np.float32)
        self.clap = np.empty((capacity,) + clap_shape, np.float32)
        self.samples: list[tuple[int, int]] = []   # waveforms' real lengths (features_on="gpu")
        self.filled = 0  # feature rows in use (rows of windows; error rows have none)

    def __len__(self) -> int:
        return len(self.meta)

    def table(self) -> pa.Table:
        valid = np.array(self.valid, dtype=bool)
        meta = pa.Table.from_pylist(self.meta, schema=_META_SCHEMA)
        ast, clap = blobs_from_rows(self.ast[:self.filled], valid), blobs_from_rows(self.clap[:self.filled], valid)
        inputs = [ast, clap]
        if "ast_samples" in self.schema.names:
            lengths = np.zeros((len(valid), 2), np.int32)
            lengths[valid] = np.array(self.samples, np.int32).reshape(-1, 2)
            inputs = [ast, pa.array(lengths[:, 0], mask=~valid), clap, pa.array(lengths[:, 1], mask=~valid)]
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
        rates = (config.ast.sample_rate, config.clap.sample_rate)
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
        ast_rate, clap_rate = self.config.ast.sample_rate, self.config.clap.sample_rate
        span16 = sample_span(window.start_s, self.config.windows.ast_window_s, ast_rate)
        span48 = sample_span(window.start_s, self.config.windows.clap_window_s, clap_rate)
        ast_wave, clap_wave = audio.waves[ast_rate][span16], audio.waves[clap_rate][span48]
        i = block.filled
        if self.config.features_on == "gpu":
            block.ast[i, :len(ast_wave)], block.ast[i, len(ast_wave):] = ast_wave, 0.0
            block.clap[i, :len(clap_wave)], block.clap[i, len(clap_wave):] = clap_wave, 0.0
            block.samples.append((len(ast_wave), len(clap_wave)))
        else:
            self._ast(ast_wave, out=block.ast[i])
            self._clap.one(clap_wave, out=block.clap[i])
        block.filled += 1


_EXTRACTORS: dict[tuple, tuple[AstFbank, ClapMel]] = {}


def _extractors(ast: AstFbankConfig, clap: ClapMelConfig) -> tuple[AstFbank, ClapMel]:
    """The worker process's feature extractors for these configs. Ray unpickles the stage afresh for
    every task, which rebuilt both mel banks each time (~1.7 ms of one core per task)."""
    key = (ast, clap)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = (AstFbank(ast), ClapMel(clap))
    return _EXTRACTORS[key]

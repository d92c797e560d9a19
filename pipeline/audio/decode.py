"""Stage 2, decoding: bytes of one file -> mono float32 waveforms at the model rates.

soundfile (libsndfile) first; PyAV (bundled FFmpeg) for what libsndfile cannot read (m4a, aac, ...).
Channels are downmixed by mean, then resampled with soxr. Anything that is not usable audio raises
`DecodeError` with a reason a person understands; the caller turns it into an error row.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import signal
import threading
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

log = logging.getLogger(__name__)


# Not an error of the file: the reason a short-file featurize task gives back a file that is longer than
# its memory reservation allows (pipeline/tagging/featurize.py); the job then runs that file in the long-file lane.
LONG_FILE = "longer than this lane takes"


class DecodeError(Exception):
    """The file is not usable audio; `reason` is meant for the output table and the summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeConfig:
    """Target rates in Hz (none: the source rate); duration bounds in seconds (the minimum is one 25 ms
    AST frame)."""

    rates: tuple[int, ...] = (16_000, 48_000)
    min_duration_s: float = 0.025
    max_duration_s: float = 6 * 3600.0
    resample_quality: str = "HQ"
    timeout_s: float | None = 600.0   # per file; a decoder that hangs this long gives an error row
    lane_s: float | None = None       # a longer file raises DecodeError(LONG_FILE): another lane takes it


@dataclass(frozen=True)
class Audio:
    """Decoded audio: mono waveforms keyed by rate (Hz), plus what the source file declared."""

    waves: dict[int, np.ndarray]
    duration_s: float
    source_rate: int
    channels: int
    decoder: str
    warning: str | None = None   # usable audio with a defect, e.g. a body shorter than its header


class Decoder:
    """Callable: `Decoder(config)(data: bytes) -> Audio`, or raises DecodeError."""

    def __init__(self, config: DecodeConfig = DecodeConfig()):
        self.config = config

    def __call__(self, data: bytes, lend: bool = False) -> Audio:
        """Decode `data`; `lend` as in decode_file."""
        if not data:
            raise DecodeError("empty file", "0 bytes")
        with _deadline(self.config.timeout_s):
            mono, rate, channels, decoder, declared = _decode(data, self.config.max_duration_s, self.config.lane_s)
        if len(mono) == 0:
            raise DecodeError("no audio samples", "header only or zero-length stream")
        duration_s = len(mono) / rate
        if duration_s < self.config.min_duration_s:
            raise DecodeError("audio too short",
                              f"{duration_s * 1000:.1f} ms, minimum {self.config.min_duration_s * 1000:.0f} ms")
        if not _all_finite(mono):  # NaN or inf in any channel survives the mean
            raise DecodeError("audio contains NaN or infinite sample values")
        rates = self.config.rates or (rate,)  # no rates: the source rate, not resampled
        waves = {r: self._resample(mono, rate, r) for r in rates}
        return Audio(waves, duration_s, rate, channels, decoder, _shortfall(len(mono), declared, rate))

    def decode_file(self, uri: str, lend: bool = False) -> Audio:
        """Read `uri` (pipeline/audio/storage.py: storage errors are DecodeErrors) and decode it. `lend` is
        IsolatedDecoder's (waveforms that may be views of a reused buffer); here they are always the
        caller's own."""
        from pipeline.audio.storage import read_bytes  # storage imports this module

        return self(read_bytes(uri))

    def _resample(self, mono: np.ndarray, rate: int, target: int) -> np.ndarray:
        if rate == target:
            return np.ascontiguousarray(mono, dtype=np.float32)
        out = soxr.resample(mono, rate, target, quality=self.config.resample_quality)
        return np.ascontiguousarray(out, dtype=np.float32)


class _Timeout(BaseException):
    """Not an Exception: the decoders' broad `except Exception` must not turn it into "not decodable"."""


@contextlib.contextmanager
def _deadline(seconds: float | None):
    """Raise DecodeError if the block runs longer than `seconds` (SIGALRM; main thread only, which is
    where Ray runs tasks; elsewhere no limit). The alarm fires between Python-level steps, e.g. between
    frames of the PyAV decode loop; a single C call that never returns cannot be interrupted."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Timeout:
        raise DecodeError("decoding timed out", f"more than {seconds:g} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _all_finite(x: np.ndarray) -> bool:
    """Whether no sample is NaN or infinite. A finite sum proves it in one pass without a mask array;
    a non-finite sum (NaN, inf, or finite samples summing past float32's range) gets the full check."""
    return bool(np.isfinite(x.sum())) or bool(np.isfinite(x).all())


def _downmix(samples: np.ndarray) -> np.ndarray:
    """Mean over channels, summed in channel order (the same values as `mean(axis=1)`, ~10x faster
    than numpy's strided reduction over a (frames, channels) array)."""
    if samples.shape[1] == 1:
        return samples[:, 0]
    mono = np.add(samples[:, 0], samples[:, 1])  # one pass for the first two channels, no copy first
    for c in range(2, samples.shape[1]):
        mono += samples[:, c]
    if samples.shape[1] == 2:
        mono *= np.float32(0.5)  # exact: the same values as dividing by 2, and faster
    else:
        mono /= np.float32(samples.shape[1])
    return mono


# Files whose float32 samples fit in WHOLE_READ_BYTES (~12 min of 44.1 kHz stereo) are read in one call,
# bitwise what sf.read gives (libsndfile's MP3 decode differs by ~1e-7 across read boundaries); longer
# ones in blocks of BLOCK_FRAMES, downmixed as they come, so memory holds one channel and the deadline
# can fire between calls.
WHOLE_READ_BYTES = 256 << 20
BLOCK_FRAMES = 1 << 20


def _check_rate(rate: int) -> None:
    if rate < 1_000 or rate > 1_536_000:
        raise DecodeError("implausible sample rate", f"{rate} Hz")


def _too_long(seconds: float, max_duration_s: float, declared: bool) -> DecodeError:
    what = "declares" if declared else "decodes to more than"
    return DecodeError("audio too long", f"file {what} {_hours(seconds)}, maximum {_hours(max_duration_s)}")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.1f} s"


# A body that decodes to fewer frames than the header declares is kept (the audio there is usable) and
# flagged. Counts from a WAV data chunk are exact; libsndfile's and FFmpeg's counts for compressed
# formats may be off by encoder delay and padding (two MP3 frames) or, for FFmpeg, estimated (1%).
SHORT_BODY = "body shorter than header declares"


@dataclass(frozen=True)
class Declared:
    """Frames the header declares, and how many fewer may decode without meaning damage."""

    frames: int
    tolerance: int = 0


def _shortfall(decoded: int, declared: Declared | None, rate: int) -> str | None:
    if declared is None or decoded >= declared.frames - declared.tolerance:
        return None
    return f"{SHORT_BODY}: {decoded / rate:.2f} s decoded of {declared.frames / rate:.2f} s"


def _decode(data: bytes, max_duration_s: float, lane_s: float | None = None,
            ) -> tuple[np.ndarray, int, int, str, Declared | None]:
    """Mono float32 samples, source rate in Hz, source channels, decoder name, declared length.

    Both decoders work block by block and downmix each block, so a many-channel or very long file is
    never held with all its channels, and a file longer than `max_duration_s` is refused before it is
    decoded (from its header) or as soon as it passes the limit (decompression bombs stay small). A
    file longer than `lane_s` raises DecodeError(LONG_FILE) the same way.
    """
    try:
        mono, rate, channels, declared = _decode_soundfile(data, max_duration_s, lane_s)
        return mono, rate, channels, "soundfile", declared
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, EOFError) as sf_error:
        try:
            mono, rate, channels, declared = _decode_pyav(data, max_duration_s, lane_s)
            return mono, rate, channels, "pyav", declared
        except DecodeError:
            raise
        except Exception as av_error:  # PyAV raises many FFmpeg error types; all mean "cannot decode"
            raise DecodeError("not a decodable audio file",
                              f"libsndfile: {_short(sf_error)}; ffmpeg: {_short(av_error)}") from av_error


def _decode_soundfile(data: bytes, max_duration_s: float, lane_s: float | None,
                      ) -> tuple[np.ndarray, int, int, Declared]:
    with sf.SoundFile(io.BytesIO(data)) as f:
        rate, channels, frames = int(f.samplerate), f.channels, f.frames
        _check_rate(rate)
        if frames > max_duration_s * rate:
            raise _too_long(frames / rate, max_duration_s, declared=True)
        if lane_s and frames > lane_s * rate:
            raise DecodeError(LONG_FILE, f"header declares {_hours(frames / rate)}")
        wav = _wav_declared_frames(data, channels, f.subtype) if f.format in ("WAV", "WAVEX") else None
        declared = Declared(wav) if wav else Declared(frames, 0 if f.format != "MP3" else 2 * 1152)
        if frames * channels * 4 <= WHOLE_READ_BYTES:
            samples = f.read(frames, dtype="float32", always_2d=True)
            return _downmix(samples), rate, channels, declared
        mono = np.empty(frames, dtype=np.float32)
        filled = 0
        while filled < frames:
            block = f.read(min(BLOCK_FRAMES, frames - filled), dtype="float32", always_2d=True)
            if not len(block):  # the body is shorter than the header says: keep what is there
                break
            mono[filled:filled + len(block)] = _downmix(block)
            filled += len(block)
    return mono[:filled], rate, channels, declared


_SAMPLE_BYTES = {"PCM_U8": 1, "PCM_S8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4,
                 "FLOAT": 4, "DOUBLE": 8}


def _wav_declared_frames(data: bytes, channels: int, subtype: str) -> int | None:
    """Frames the RIFF `data` chunk declares (libsndfile silently clamps its count to the bytes present);
    None when unknown: a compressed subtype, or a streaming writer's placeholder size (0 or 0xFFFFFFFF)."""
    width = _SAMPLE_BYTES.get(subtype)
    if width is None or data[:4] != b"RIFF":
        return None
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        if data[pos:pos + 4] == b"data":
            return None if size in (0, 0xFFFFFFFF) else size // (width * channels)
        pos += 8 + size + (size & 1)
    return None


def _decode_pyav(data: bytes, max_duration_s: float, lane_s: float | None,
                 ) -> tuple[np.ndarray, int, int, Declared | None]:
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        streams = container.streams.audio
        if not streams:
            raise DecodeError("no audio stream in file")
        stream = streams[0]
        rate = stream.codec_context.sample_rate or stream.rate
        _check_rate(int(rate))
        channels = stream.codec_context.channels
        limit = max_duration_s * rate
        resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
        chunks, total = [], 0

        def take(frames) -> None:
            nonlocal total
            for out in frames:
                chunks.append(_downmix(out.to_ndarray().T))  # planar (channels, n) -> mono (n,)
                total += len(chunks[-1])
            if total > limit:
                raise _too_long(total / rate, max_duration_s, declared=False)
            if lane_s and total > lane_s * rate:
                raise DecodeError(LONG_FILE, f"decodes to more than {_hours(lane_s)}")

        for frame in container.decode(stream):
            take(resampler.resample(frame))
        take(resampler.resample(None))
        declared = None
        if stream.duration and stream.time_base:
            frames = int(stream.duration * stream.time_base * rate)
            declared = Declared(frames, 2 * 1152 + frames // 100)
    if not chunks:
        raise DecodeError("no audio samples", "header only or zero-length stream")
    return np.concatenate(chunks), int(rate), int(channels), declared


def _short(error: BaseException) -> str:
    """First line of a decoder's message without object addresses or errno noise."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"Error opening <[^>]*>: ", "", text)
    text = re.sub(r"^\[Errno -?\d+\] ", "", text)
    text = re.sub(r": '<none>'$", "", text)
    return text[:160]

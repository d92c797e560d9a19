"""Test audio made on the fly: real encoded bytes from soundfile and PyAV, and broken files."""

from __future__ import annotations

import io

import av
import numpy as np
import soundfile as sf


def signal(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(frames, channels) float32: a chirp plus noise, different per channel."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    chans = [0.3 * np.sin(2 * np.pi * (150 + 90 * c + 120 * t) * t) + 0.03 * rng.standard_normal(len(t))
             for c in range(channels)]
    return np.stack(chans, axis=1).astype(np.float32)


def encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    """Encode with libsndfile: fmt is WAV, FLAC, OGG or MP3."""
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def encode_m4a(samples: np.ndarray, rate: int) -> bytes:
    """AAC in an MP4 container, through PyAV's FFmpeg (libsndfile cannot read this)."""
    layout = "mono" if samples.shape[1] == 1 else "stereo"
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


BROKEN_REASONS = {  # broken_files() that must become error rows -> reason prefix; the rest decode
    "empty.wav": "empty file",
    "random_bytes.wav": "not a decodable audio file",
    "text_named.flac": "not a decodable audio file",
    "header_only.wav": "no audio samples",
    "zero_samples.wav": "no audio samples",
    "nan_samples.wav": "audio contains NaN or infinite sample values",
    "inf_samples.wav": "audio contains NaN or infinite sample values",
}


def broken_files() -> dict[str, bytes]:
    """name -> bytes of every kind of bad input the job must turn into an error row (or a result)."""
    good = signal(2.0, 16_000)
    wav = encode(good, 16_000, "WAV", "PCM_16")
    mp3 = encode(signal(3.0, 44_100), 44_100, "MP3")
    nan = good.copy()
    nan[100:110] = np.nan
    inf = good.copy()
    inf[5] = np.inf
    return {
        "empty.wav": b"",
        "random_bytes.wav": np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text_named.flac": b"This is a text file, not FLAC.\n" * 20,
        "truncated.mp3": mp3[: len(mp3) // 3],
        "header_only.wav": wav[:44],
        "truncated_body.wav": wav[: 44 + 1000],
        "zero_samples.wav": encode(np.zeros((0, 1), np.float32), 16_000, "WAV", "PCM_16"),
        "nan_samples.wav": encode(nan, 16_000, "WAV", "FLOAT"),
        "inf_samples.wav": encode(inf, 16_000, "WAV", "FLOAT"),
        "m4a_named.wav": encode_m4a(signal(1.5, 44_100, 2), 44_100),
        "fifty_ms.wav": encode(signal(0.05, 22_050), 22_050, "WAV", "PCM_16"),
    }

"""Deterministic analysis windows over a file (no random crops).

A segment is the CLAP window [start_s, start_s + 10 s); the AST window starts at the same sample and
lasts 10.24 s (1024 frames). Starts are k * hop; for files longer than one window the last window is
aligned to the file's end so that every window holds real audio. A file no longer than one CLAP
window is one window, padded by the feature stages the way the reference pads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WindowConfig:
    """Window lengths and hop in seconds."""

    hop_s: float = 10.0
    clap_window_s: float = 10.0
    ast_window_s: float = 10.24

    def __post_init__(self):
        if not 0 < self.hop_s <= self.clap_window_s:
            raise ValueError(f"hop must be in (0, {self.clap_window_s}] s, got {self.hop_s}")


@dataclass(frozen=True)
class Window:
    index: int
    start_s: float
    end_s: float


def plan_windows(duration_s: float, config: WindowConfig = WindowConfig()) -> list[Window]:
    """Windows covering [0, duration_s]; the last ends exactly at duration_s."""
    width = config.clap_window_s
    if duration_s <= width:
        return [Window(0, 0.0, duration_s)]
    count = math.ceil((duration_s - width) / config.hop_s - 1e-9) + 1
    starts = [k * config.hop_s for k in range(count - 1)] + [duration_s - width]
    return [Window(k, s, min(s + width, duration_s)) for k, s in enumerate(starts)]


def sample_span(start_s: float, length_s: float, rate: int) -> slice:
    """The slice of a waveform at `rate` Hz that a window starting at `start_s` covers."""
    start = round(start_s * rate)
    return slice(start, start + round(length_s * rate))

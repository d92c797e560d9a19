"""A compact set of 128-bit keys (hashes) in numpy arrays: 16 bytes per key, no Python object per key.

Used where the driver must remember millions of things it has seen (the URIs of a manifest, the
identities of done files) while holding only one chunk of rows at a time.

Keys are kept in sorted runs (by their high 64 bits, the low 64 bits alongside), log-structured: a new
run is merged into the last one while that is no more than twice its size, so adding n keys in chunks
costs O(n log n) and the set is always a handful of runs. Membership is a binary search per run.
"""

from __future__ import annotations

import numpy as np


class KeySet:
    """Set of 128-bit keys given as (hi, lo) uint64 arrays of the same length."""

    def __init__(self):
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # each sorted by hi

    def __len__(self) -> int:
        return sum(len(hi) for hi, _ in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(hi.nbytes + lo.nbytes for hi, lo in self._runs)

    def add(self, hi: np.ndarray, lo: np.ndarray) -> None:
        """Add keys (duplicates of keys already present are harmless: they only cost 16 bytes)."""
        if not len(hi):
            return
        order = np.argsort(hi, kind="stable")
        self._runs.append((np.ascontiguousarray(hi[order], np.uint64), np.ascontiguousarray(lo[order], np.uint64)))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            self._runs.append(_merge(self._runs.pop(-2), self._runs.pop()))

    def contains(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Boolean mask: which of the given keys are in the set."""
        order = np.argsort(hi, kind="stable")  # sorted queries: the binary searches walk memory in order
        hi, lo = hi[order], lo[order]
        found = np.zeros(len(hi), dtype=bool)
        for run in self._runs:
            found |= _in_run(run, hi, lo)
        unsorted = np.empty_like(found)
        unsorted[order] = found
        return unsorted


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Two runs as one, sorted by hi, without sorting again: b's keys go to their search positions. Each
    input half is let go as soon as it is copied, so the peak is ~1.5x the keys, not 2x."""
    a, b = list(a), list(b)
    at = np.searchsorted(a[0], b[0], side="right") + np.arange(len(b[0]))
    from_a = np.ones(len(a[0]) + len(b[0]), dtype=bool)
    from_a[at] = False
    merged = []
    for half in (0, 1):
        out = np.empty(len(from_a), dtype=np.uint64)
        out[at] = b[half]
        out[from_a] = a[half]
        a[half] = b[half] = None
        merged.append(out)
    return merged[0], merged[1]


def _in_run(run: tuple[np.ndarray, np.ndarray], hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    run_hi, run_lo = run
    if not len(run_hi):
        return np.zeros(len(hi), dtype=bool)
    pos = np.minimum(np.searchsorted(run_hi, hi, side="left"), len(run_hi) - 1)
    same_hi = run_hi[pos] == hi
    found = same_hi & (run_lo[pos] == lo)
    # Equal high halves with different low halves (a 2^-64 event per pair): look at the rest of the
    # run's keys with that high half.
    for i in np.flatnonzero(same_hi & ~found):
        j = pos[i] + 1
        while j < len(run_hi) and run_hi[j] == hi[i]:
            if run_lo[j] == lo[i]:
                found[i] = True
                break
            j += 1
    return found


def split_digests(digests: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) uint64 arrays from concatenated 16-byte digests."""
    pairs = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()

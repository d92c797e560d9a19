"""Decoding in a child process: a decoder that hangs inside one C call, or crashes (segfault, abort,
killed for memory) on a hostile file, costs that file an error row, not the Ray worker and the job.

`IsolatedDecoder(config)(data)` sends the file's bytes over a pipe to a long-lived child running
`Decoder(config)` and gets back the `Audio` (or the DecodeError's reason); `decode_file(uri)` sends
only the path of a local file, which the child reads itself (its bytes never cross the pipe). Waveforms
come back through a shared memory buffer (a memfd both processes map, `SHARED_BYTES`: about 2 min of
audio at 16 + 48 kHz): the child writes them there and the worker reads them in place, with no pipe
copies and no system calls per block; `lend=True` hands out views of that buffer, valid until the next
call, and otherwise the worker gets copies. Longer files' waveforms come over the pipe as raw
float32 bytes read straight into their arrays (not through pickle); the pipes hold 1 MiB where the
system allows (Linux default 64 KiB: ~40 wake-ups per 10 s clip). The whole exchange runs
in a helper thread; the caller waits at most `timeout_s + grace_s` seconds, then kills the child,
answers "decoding timed out", and the next file gets a fresh child. The child's own SIGALRM deadline
(`timeout_s`) still handles slow Python-level decoding without a restart. One child per worker
process and config; the child exits when its pipe closes (the worker ended).
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Connection

import numpy as np

from pipeline.audio.decode import Audio, DecodeConfig, DecodeError, Decoder
from pipeline.audio.storage import plain_path, read_bytes

log = logging.getLogger(__name__)

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; Python >= 3.10 names it
PIPE_BYTES = 1 << 20
SHARED_BYTES = 32 << 20  # waveforms of files up to ~131 s at 16 + 48 kHz travel through shared memory


class IsolatedDecoder:
    """Callable like `Decoder`: `IsolatedDecoder(config)(data: bytes) -> Audio`, or DecodeError."""

    def __init__(self, config: DecodeConfig = DecodeConfig(), grace_s: float = 5.0,
                 shared_bytes: int = SHARED_BYTES):
        self.config = config
        self.shared_bytes = shared_bytes
        self.wait_s = (config.timeout_s or 24 * 3600.0) + grace_s
        self.busy_since: float | None = None  # monotonic time the current file was handed over
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._shared: mmap.mmap | None = None  # this child's waveform buffer, mapped here too

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __call__(self, data: bytes, lend: bool = False) -> Audio:
        """Decode `data`. `lend`: the waveforms may be views of the shared buffer, valid only until this
        decoder's next call (the caller is done with them by then); otherwise they are copies."""
        if not data:
            raise DecodeError("empty file", "0 bytes")
        return self._exchange(("bytes", len(data)), data, lend)

    def decode_file(self, uri: str, lend: bool = False) -> Audio:
        """Read and decode `uri`: a plain local path is read by the child; anything else is read here
        (fsspec, with retries) and its bytes sent. Storage errors are DecodeErrors either way."""
        if not plain_path(uri):
            return self(read_bytes(uri), lend)
        return self._exchange(("path", uri), None, lend)

    def _exchange(self, request: tuple, data: bytes | None, lend: bool) -> Audio:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        reply: dict = {}
        conn, shared = self._conn, self._shared

        def exchange() -> None:
            try:
                conn.send(request)
                if data is not None:
                    conn.send_bytes(data)
                reply["answer"] = conn.recv()
                if reply["answer"][0] == "ok" and not reply["answer"][3]:  # not in the shared buffer
                    reply["waves"] = {rate: conn.recv_array(length) for rate, length in reply["answer"][2]}
            except Exception as e:  # EOF, broken pipe: the child died or was killed
                reply["lost"] = e

        helper = threading.Thread(target=exchange, name="decode-exchange", daemon=True)
        self.busy_since = time.monotonic()
        helper.start()
        helper.join(self.wait_s)
        self.busy_since = None
        if helper.is_alive():
            self._kill()  # the helper then sees a broken pipe or EOF and ends
            helper.join()
            self._stop()
            raise DecodeError("decoding timed out", f"decoder process stopped after {self.wait_s:g} s")
        if "lost" in reply:
            raise DecodeError("decoder crashed", self._stop())
        kind, payload = reply["answer"][:2]
        if kind == "error":
            raise DecodeError(*payload)
        # views of the shared buffer are made here, not in the helper, where a fault of ours would pass
        # for the child's crash
        waves = reply["waves"] if "waves" in reply else _shared_views(shared, reply["answer"][2], copy=not lend)
        return Audio(waves=waves, **payload)

    def _start(self) -> None:
        self._stop()
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        shared_fd = os.memfd_create("decoder-waves", os.MFD_CLOEXEC)
        try:
            os.ftruncate(shared_fd, self.shared_bytes)  # tmpfs pages: memory is taken only where written
            self._shared = mmap.mmap(shared_fd, self.shared_bytes)
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.tagging.isolation", str(child_r), str(child_w), str(shared_fd),
                 str(self.shared_bytes), json.dumps(asdict(self.config))], pass_fds=(child_r, child_w, shared_fd),
                stdin=subprocess.DEVNULL)
        finally:
            os.close(shared_fd)  # the mappings keep the memory
            os.close(child_r)
            os.close(child_w)
        for fd in (parent_r, parent_w):
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:  # above /proc/sys/fs/pipe-max-size for this user: keep the default
                pass
        self._conn = _Duplex(parent_r, parent_w)
        log.debug("decoder child %d started", self._proc.pid)

    def _kill(self) -> str:
        """Kill the child if running; say how it ended."""
        if self._proc is None:
            return ""
        if self._proc.poll() is None:
            self._proc.kill()
        code = self._proc.wait()
        if code < 0:
            return f"decoder process killed by {signal.Signals(-code).name}"
        return f"decoder process exited with status {code}"

    def _stop(self) -> str:
        """Kill the child, close the pipes, forget both; say how the child ended."""
        ended = self._kill()
        self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._shared = None  # unmapped once no lent view refers to it
        return ended

    def close(self) -> None:
        self._stop()

    def __del__(self):
        try:
            self._stop()
        except Exception:
            pass


class _Duplex:
    """A multiprocessing Connection over two one-way pipes (subprocess passes plain fds)."""

    def __init__(self, read_fd: int, write_fd: int):
        self._r, self._w = Connection(read_fd, writable=False), Connection(write_fd, readable=False)

    def send_bytes(self, data: bytes) -> None:
        self._w.send_bytes(data)

    def send(self, obj) -> None:
        self._w.send(obj)

    def recv_bytes(self) -> bytes:
        return self._r.recv_bytes()

    def recv(self):
        return self._r.recv()

    def send_array(self, array: np.ndarray) -> None:
        """Raw bytes of a contiguous array, no pickling (an hour at 48 kHz is 0.7 GB)."""
        view = memoryview(array).cast("B")
        while view:
            view = view[os.write(self._w.fileno(), view):]

    def recv_array(self, length: int) -> np.ndarray:
        """`length` float32 values read straight into a new array (no intermediate copy)."""
        array = np.empty(length, dtype=np.float32)
        view = memoryview(array).cast("B")
        while view:
            got = os.readv(self._r.fileno(), [view])
            if not got:
                raise EOFError("decoder pipe closed")
            view = view[got:]
        return array

    def close(self) -> None:
        self._r.close()
        self._w.close()


def _shared_views(shared: mmap.mmap, lengths: list[tuple[int, int]], copy: bool) -> dict[int, np.ndarray]:
    """The waveforms the child wrote one after another into `shared`, as float32 arrays keyed by rate:
    views (left writeable: torch warns on every read-only array it wraps), or copies."""
    waves, offset = {}, 0
    for rate, length in lengths:
        view = np.frombuffer(shared, dtype=np.float32, count=length, offset=offset)
        waves[rate] = view.copy() if copy else view
        offset += 4 * length
    return waves


_DECODERS: dict[DecodeConfig, IsolatedDecoder] = {}


def shared_decoder(config: DecodeConfig) -> IsolatedDecoder:
    """The worker process's decoder for `config` (Ray runs many tasks per worker; one child serves all)."""
    if config not in _DECODERS:
        _DECODERS[config] = IsolatedDecoder(config)
    return _DECODERS[config]


def _serve(read_fd: int, write_fd: int, shared_fd: int, shared_bytes: int, config: DecodeConfig) -> None:
    """Child: decode each received file until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when this process ends
    conn, decoder = _Duplex(read_fd, write_fd), Decoder(config)
    shared = mmap.mmap(shared_fd, shared_bytes)
    os.close(shared_fd)
    while True:
        try:
            kind, what = conn.recv()
            data = conn.recv_bytes() if kind == "bytes" else None
        except (EOFError, OSError):
            return
        try:
            if data is None:
                data = read_bytes(what)
            audio = decoder(data)
        except DecodeError as e:
            conn.send(("error", (e.reason, e.detail)))
            continue
        except MemoryError:
            conn.send(("error", ("out of memory decoding file", f"{len(data or b'')} bytes in")))
            continue
        del data
        meta = {"duration_s": audio.duration_s, "source_rate": audio.source_rate, "channels": audio.channels,
                "decoder": audio.decoder, "warning": audio.warning}
        lengths = [(rate, len(wave)) for rate, wave in audio.waves.items()]
        in_shared = 4 * sum(n for _, n in lengths) <= shared_bytes
        if in_shared:  # the worker is done with the previous file's waveforms: it asked for this one
            offset = 0
            for wave in audio.waves.values():
                np.frombuffer(shared, dtype=np.float32, count=len(wave), offset=offset)[:] = wave
                offset += 4 * len(wave)
        conn.send(("ok", meta, lengths, in_shared))
        if not in_shared:
            for wave in audio.waves.values():
                conn.send_array(np.ascontiguousarray(wave, dtype=np.float32))
        del audio


if __name__ == "__main__":
    fields = json.loads(sys.argv[5])
    fields["rates"] = tuple(fields["rates"])
    _serve(*(int(a) for a in sys.argv[1:5]), DecodeConfig(**fields))

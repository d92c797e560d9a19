"""Where a model runs and in what precision: CUDA when the actor got a GPU, else CPU.

Precision is a run setting (`TagJobConfig.precision`, resolved once per run and part of the settings
hash), never a side effect of the device, so the precision recorded with a row is the one that computed
it: "fp32" is plain float32 everywhere (TF32 off on CUDA; parity with the HF float32 reference within
1e-4); "bf16" casts the weights to bfloat16 and feeds bfloat16 inputs, with no autocast (autocast
re-casts weights on every op; at micro-batch 8 it measured slower than fp32 for CLAP on an H100, issue
13), on whichever device the actor has. "auto" (resolved by the job) is bf16 when the model actors get
GPUs and fp32 on CPU, where bf16 breaks AST parity (BENCHMARKS.md, Models).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.arrow import blobs_to_padded, where
from pipeline.audio.resample_device import Resample

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


def resolve_precision(requested: str, uses_gpus: bool) -> str:
    """The run's precision: "auto" is bf16 when the model actors get GPUs, fp32 on CPU (where bf16
    breaks AST parity and is no faster, BENCHMARKS.md); "fp32" or "bf16" as given."""
    if requested == "auto":
        return "bf16" if uses_gpus else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32 or bf16, got {requested!r}")
    return requested


@dataclass(frozen=True)
class Placement:
    """Device, the dtype weights and inputs are cast to (None: float32), and an optional autocast dtype
    (kept for benchmarks.models' CPU options; the job itself never autocasts)."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    weight_dtype: torch.dtype | None = None

    @classmethod
    def detect(cls, cpu_threads: int | None = None, precision: str = "fp32") -> "Placement":
        """CUDA if visible (Ray sets CUDA_VISIBLE_DEVICES per actor), else CPU with `cpu_threads`;
        `precision` is "fp32" or "bf16" (PRECISIONS), honoured on either device."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        dtype = torch.bfloat16 if precision == "bf16" else None
        if torch.cuda.is_available():
            if dtype is None:  # float32 means float32: no TF32 matmuls or convolutions
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            elif not torch.cuda.is_bf16_supported():
                raise RuntimeError("this GPU has no bfloat16 support: run with --precision fp32")
            return cls(torch.device("cuda"), None, dtype)
        if cpu_threads:
            torch.set_num_threads(max(1, int(cpu_threads)))
        return cls(torch.device("cpu"), None, dtype)

    @property
    def precision(self) -> str:
        return "bf16" if self.weight_dtype == torch.bfloat16 else "fp32"

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move a model to the device and cast its weights to the compute dtype."""
        model = model.to(self.device)
        return model.to(self.weight_dtype) if self.weight_dtype is not None else model

    def to_device(self, array: np.ndarray | torch.Tensor, cast: bool = True) -> torch.Tensor:
        """Host array or tensor (pinned on CUDA: see `Staging`) -> tensor on the device, in the compute
        dtype if `cast` (waveforms are not cast: their features are computed in float32/float64 first)."""
        tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
        if self.device.type == "cuda":
            tensor = tensor.to(self.device, non_blocking=True)
        return self.cast(tensor) if cast else tensor

    def cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """A model input in the compute dtype."""
        return tensor.to(self.weight_dtype) if self.weight_dtype is not None else tensor

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


class Staging:
    """One reusable host buffer of exactly `micro_batch` rows (page-locked on CUDA, so the copy to the
    GPU is a DMA that needs no extra host copy). Each micro-batch is copied in once, the tail is zero-
    padded, and the buffer is rewritten only after the previous batch's results came back to the host
    (`.cpu()` waits for the GPU), so an asynchronous copy never reads a half-written buffer."""

    def __init__(self, placement: Placement):
        self.placement = placement
        self._tensor: torch.Tensor | None = None
        self._buffer: np.ndarray | None = None    # numpy view of the same memory

    def fill(self, rows: np.ndarray, micro_batch: int) -> torch.Tensor:
        shape = (micro_batch,) + rows.shape[1:]
        if self._buffer is None or self._buffer.shape != shape or self._buffer.dtype != rows.dtype:
            self._tensor = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, rows.dtype)).dtype,
                                       pin_memory=self.placement.device.type == "cuda")
            self._buffer = self._tensor.numpy()
        self._buffer[:len(rows)] = rows
        self._buffer[len(rows):] = 0
        return self._tensor


def run_fixed_batches(fn, inputs: np.ndarray | tuple[np.ndarray, ...], micro_batch: int, placement: Placement,
                      staging: Staging | list[Staging] | None = None, cast: bool = True) -> list[np.ndarray]:
    """Apply `fn` to `inputs` in zero-padded micro-batches of exactly `micro_batch` rows.

    A fixed shape makes every row's result independent of how rows were grouped (measured: bitwise
    equal on CPU), so results do not depend on the job's batch size or on the order of inputs.
    `inputs` may be a read-only view (e.g. of an Arrow buffer): rows are copied into `staging`. A tuple
    of arrays (rows aligned) gives `fn` one tensor each, with one Staging each. `cast`: inputs arrive in
    the compute dtype (else as they are, for `fn` to cast).
    `fn` returns a tuple of tensors with the batch as first dimension; float32 numpy arrays come back.
    """
    arrays = inputs if isinstance(inputs, tuple) else (inputs,)
    stagings = staging if isinstance(staging, list) else [staging] if staging else []
    stagings += [Staging(placement) for _ in range(len(arrays) - len(stagings))]
    outputs: list[list[np.ndarray]] = []
    for start in range(0, len(arrays[0]), micro_batch):
        chunks = [a[start:start + micro_batch] for a in arrays]
        n = len(chunks[0])
        with torch.inference_mode(), placement.autocast():
            result = fn(*(placement.to_device(s.fill(c, micro_batch), cast) for s, c in zip(stagings, chunks)))
            outputs.append([r[:n].float().cpu().numpy() for r in result])
    return [np.concatenate(parts) for parts in zip(*outputs)]


WAVE_COLUMNS = ("wave", "wave_first", "source_frames")   # featurize.py's model inputs with --features-on gpu


def wave_inputs(batch: pa.Table, ok: np.ndarray, resample: Resample) -> tuple[np.ndarray, np.ndarray]:
    """The `ok` rows' source slices, zero-padded to the longest, and their resampling plans for `resample`:
    the inputs of a model actor that resamples and featurizes on its device."""
    def column(name: str) -> np.ndarray:
        return np.asarray(where(batch.column(name), ok).to_numpy())

    plans = resample.plan(column("sample_rate"), column("wave_first"), column("source_frames"), column("start_s"))
    return blobs_to_padded(where(batch.column("wave"), ok)), plans

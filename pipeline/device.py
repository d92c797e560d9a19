"""Where a model runs: CUDA when the actor got a GPU, else CPU; and at which precision.

Precision is a run setting (TagJobConfig.precision, part of the settings hash), never a side effect of
the device: "fp32" is float32 everywhere (TF32 off on CUDA), "bf16" is bfloat16 autocast on whichever
device the actor has. So the precision recorded with a row is the one that computed it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

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
    """Device plus how inputs move there and which autocast dtype (None: full float32) applies."""

    device: torch.device
    autocast_dtype: torch.dtype | None

    @classmethod
    def detect(cls, cpu_threads: int | None = None, precision: str = "fp32") -> "Placement":
        """CUDA if visible (Ray sets CUDA_VISIBLE_DEVICES per actor), else CPU with `cpu_threads`;
        `precision` is "fp32" or "bf16" (PRECISIONS)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        dtype = torch.bfloat16 if precision == "bf16" else None
        if torch.cuda.is_available():
            if dtype is None:  # float32 means float32: no TF32 matmuls or convolutions
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            elif not torch.cuda.is_bf16_supported():
                raise RuntimeError("this GPU has no bfloat16 support: run with --precision fp32")
            return cls(torch.device("cuda"), dtype)
        if cpu_threads:
            torch.set_num_threads(max(1, int(cpu_threads)))
        return cls(torch.device("cpu"), dtype)

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """Copy a host array to the device; pinned and asynchronous on CUDA."""
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def run_fixed_batches(fn, inputs: np.ndarray, micro_batch: int, placement: Placement) -> list[np.ndarray]:
    """Apply `fn` to `inputs` in zero-padded micro-batches of exactly `micro_batch` rows.

    A fixed shape makes every row's result independent of how rows were grouped (measured: bitwise
    equal on CPU), so results do not depend on the job's batch size or on the order of inputs.
    `fn` returns a tuple of tensors with the batch as first dimension; float32 numpy arrays come back.
    """
    outputs: list[list[np.ndarray]] = []
    for start in range(0, len(inputs), micro_batch):
        chunk = inputs[start:start + micro_batch]
        n = len(chunk)
        if n < micro_batch:
            chunk = np.concatenate([chunk, np.zeros((micro_batch - n,) + chunk.shape[1:], chunk.dtype)])
        with torch.inference_mode(), placement.autocast():
            result = fn(placement.to_device(chunk))
        outputs.append([r[:n].float().cpu().numpy() for r in result])
    return [np.concatenate(parts) for parts in zip(*outputs)]

"""Where a model runs: CUDA when the actor got a GPU, else CPU; with the matching precision tricks."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Device plus how inputs move there and which autocast dtype (None: full float32) applies."""

    device: torch.device
    autocast_dtype: torch.dtype | None

    @classmethod
    def detect(cls, cpu_threads: int | None = None) -> "Placement":
        """CUDA if visible (Ray sets CUDA_VISIBLE_DEVICES per actor), else CPU with `cpu_threads`."""
        if torch.cuda.is_available():
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return cls(torch.device("cuda"), dtype)
        if cpu_threads:
            torch.set_num_threads(max(1, int(cpu_threads)))
        return cls(torch.device("cpu"), None)

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

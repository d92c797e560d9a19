"""CPU placement: float32 with the requested thread count (the measured choice, see BENCHMARKS.md, Models)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pipeline.device import Placement


def test_cpu_placement_is_float32_with_the_requested_threads():
    """bf16 autocast and dynamic int8 miss the AST 1e-4 logit bar and bf16 CLAP sits at the 0.9999
    cosine bar (python -m benchmarks.models), so CPU inference stays float32."""
    if torch.cuda.is_available():
        pytest.skip("CUDA visible: detect() picks the GPU")
    before = torch.get_num_threads()
    try:
        placement = Placement.detect(cpu_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert placement.device.type == "cpu" and placement.autocast_dtype is None
    assert isinstance(placement.autocast(), contextlib.nullcontext)

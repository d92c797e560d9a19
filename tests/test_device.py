"""CPU placement: float32 with the requested thread count (the measured choice, see BENCHMARKS.md, Models)."""

from __future__ import annotations

import contextlib

import numpy as np

import pytest
import torch

from pipeline.models.device import Placement


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


def test_precision_resolves_per_plan_and_rejects_unknown():
    from pipeline.models.device import resolve_precision

    assert resolve_precision("auto", uses_gpus=False) == "fp32"
    assert resolve_precision("auto", uses_gpus=True) == "bf16"
    assert resolve_precision("fp32", uses_gpus=True) == "fp32"
    assert resolve_precision("bf16", uses_gpus=False) == "bf16"
    with pytest.raises(ValueError):
        resolve_precision("fp16", uses_gpus=True)
    with pytest.raises(ValueError):
        Placement.detect(precision="auto")  # the job resolves "auto" once per run, never an actor


def test_fixed_batches_are_independent_of_grouping_and_read_only_inputs():
    """The staging buffer is reused across micro-batches and calls; results per row stay bitwise equal
    whatever the grouping, and a read-only input (a view of an Arrow buffer) is accepted."""
    from pipeline.models.device import Staging, run_fixed_batches

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).eval()
    placement = Placement(torch.device("cpu"))
    inputs = np.random.default_rng(0).standard_normal((11, 16)).astype(np.float32)
    inputs.flags.writeable = False
    staging = Staging(placement)
    (whole,) = run_fixed_batches(lambda x: (layer(x),), inputs, 4, placement, staging)
    parts = [run_fixed_batches(lambda x: (layer(x),), inputs[i:j], 4, placement, staging)[0]
             for i, j in ((0, 3), (3, 10), (10, 11))]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    assert whole.shape == (11, 4)


def test_bf16_casts_weights_and_runs_both_models(checkpoints):
    """Precision bf16 (weights and inputs cast to bfloat16, no autocast, float32 results back) is what
    an actor runs on whichever device it has; on the CPU here it runs and differs from fp32 only by bf16
    rounding. The deviation on a GPU is measured by benchmarks.node, not here."""
    import pyarrow as pa

    from pipeline.arrow import blobs_from_rows, to_matrix
    from pipeline.models.embedder import ClapEmbedder, EmbedderConfig
    from pipeline.models.tagger import AstTagger, TaggerConfig

    rng = np.random.default_rng(0)
    n = 3
    table = pa.table({"status": ["ok"] * n,
                      "ast_features": blobs_from_rows(rng.standard_normal((n, 1024, 128), np.float32) * 0.5,
                                                      np.ones(n, bool)),
                      "clap_features": blobs_from_rows(rng.standard_normal((n, 1, 1001, 64), np.float32) * 10 - 40,
                                                       np.ones(n, bool))})
    before = torch.get_num_threads()
    try:
        out = {}
        for precision in ("fp32", "bf16"):
            ast = AstTagger(TaggerConfig(checkpoints["ast"], micro_batch=2, precision=precision))
            clap = ClapEmbedder(EmbedderConfig(checkpoints["clap"], micro_batch=2, precision=precision))
            assert ast.placement.precision == clap.placement.precision == precision
            dtype = next(ast.model.parameters()).dtype
            assert dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
            assert next(clap.model.parameters()).dtype == dtype
            result = clap(ast(table))
            out[precision] = (to_matrix(result.column("scores")), to_matrix(result.column("clap_embedding")))
    finally:
        torch.set_num_threads(before)
    for f32, b16 in zip(out["fp32"], out["bf16"]):
        assert b16.dtype == np.float32 and np.isfinite(b16).all()
        assert not np.array_equal(f32, b16)  # it did run in another precision
        np.testing.assert_allclose(b16, f32, atol=0.1)

"""Shared fixtures: small random-weight checkpoints of the real architectures, and a local Ray."""

from __future__ import annotations

import os

import pytest
import ray

from pipeline.demo import build_tiny_ast, build_tiny_clap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{"ast": dir, "clap": dir}: saved with save_pretrained, loaded through the job's own loader."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {"ast": str(build_tiny_ast(root / "ast")), "clap": str(build_tiny_clap(root / "clap"))}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with more logical CPUs than cores, so actors never starve the read tasks.

    Module-scoped and re-entrant: a module that needs another cluster shape shuts Ray down after it.
    """
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield

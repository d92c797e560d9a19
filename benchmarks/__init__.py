"""Benchmarks: each module prints a table and writes JSON under benchmarks/results/ (BENCHMARKS.md)."""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (else platform.processor(), '' if unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def machine() -> dict:
    """The machine a result comes from: architecture, CPU count, CPU model."""
    return {"arch": platform.machine(), "cpus": os.cpu_count(), "cpu_model": cpu_model()}


def write_result(path: str, result: dict) -> None:
    """Write a benchmark's result as indented JSON at `path` (directories made as needed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    logging.getLogger("benchmarks").info("wrote %s", path)


def child_cpu_s(pid: int | None) -> float:
    """CPU seconds of every thread of process `pid` so far (scheduler statistics, ns resolution)."""
    if pid is None:
        return 0.0
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9

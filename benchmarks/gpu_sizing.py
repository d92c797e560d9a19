"""GPU sizing on paper: how many CPU cores per GPU keep the GPU fed with features.

    windows/s one GPU can take  = GPU peak dense fp16/bf16 FLOP/s x achieved fraction (MFU)
                                  / (AST + CLAP-audio FLOPs per window)
    cores per GPU               = that / feature windows/s per core (decode + resample + fbank + mel)

FLOPs per window are counted (torch.utils.flop_counter) on the published architectures at full size
(AST base 768x12 on 1024x128 fbank; CLAP HTSAT-tiny audio tower on 1x1001x64 mel), random weights. The
feature rate per core is read from benchmarks/results/features.json (python -m benchmarks.features).
GPU peaks are spec-sheet dense tensor figures; the achieved fraction is an assumption (--mfu), not a
measurement: no GPU was available. pipeline/tagging/resources.py uses the same formula to warn when a cluster
has too few CPUs per GPU.

Usage: python -m benchmarks.gpu_sizing [--mfu 0.3] [--out benchmarks/results/gpu_sizing.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

from pipeline.tagging.resources import GPU_MFU, GPU_PEAK_TFLOPS

log = logging.getLogger("benchmarks.gpu_sizing")


def flops_per_window() -> dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import ASTConfig, ASTForAudioClassification, ClapConfig, ClapModel

    ast = ASTForAudioClassification(ASTConfig(num_labels=527)).eval()
    clap = ClapModel(ClapConfig()).eval()
    with torch.inference_mode():
        with FlopCounterMode(display=False) as count:
            ast(input_values=torch.zeros(1, 1024, 128))
        ast_flops = count.get_total_flops()
        with FlopCounterMode(display=False) as count:
            clap.get_audio_features(input_features=torch.zeros(1, 1, 1001, 64))
        clap_flops = count.get_total_flops()
    return {"ast": float(ast_flops), "clap_audio": float(clap_flops)}


def feature_rates(path: Path) -> dict[str, float]:
    """Ours clips/s per core (one thread, CPU time) per format, from the feature benchmark's JSON."""
    data = json.loads(path.read_text())
    return {row["format"]: row["ours_clips_per_s_cpu"] for row in data["rows"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mfu", type=float, default=GPU_MFU,
                   help="achieved fraction of peak FLOP/s "
                        "(default: pipeline.tagging.resources.GPU_MFU, measured on an H100)")
    p.add_argument("--features", default="benchmarks/results/features.json")
    p.add_argument("--cpu-cost", default="benchmarks/results/cpu_cost_cpu_run1.json",
                   help="python -m benchmarks.cpu_cost's result: the job's CPU side per clip (column 'job')")
    p.add_argument("--out", default="benchmarks/results/gpu_sizing.json")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    flops = flops_per_window()
    per_window = flops["ast"] + flops["clap_audio"]
    rates = feature_rates(Path(args.features))
    if Path(args.cpu_cost).exists():  # what the planner uses: the whole job's CPU side, not one thread
        rates["job"] = round(1000 / json.loads(Path(args.cpu_cost).read_text())["cpu_side_ms_per_clip"], 1)
    rows = []
    for gpu, tflops in GPU_PEAK_TFLOPS.items():
        gpu_windows = tflops * 1e12 * args.mfu / per_window
        rows.append({"gpu": gpu, "peak_tflops": tflops, "gpu_windows_per_s": round(gpu_windows, 1),
                     **{f"cores_{fmt.lower()}": round(gpu_windows / rate, 1) for fmt, rate in rates.items()}})
    print(f"FLOPs per 10 s window: AST {flops['ast'] / 1e9:.1f} G, CLAP audio {flops['clap_audio'] / 1e9:.1f} G; "
          f"MFU {args.mfu}; feature clips/s per core: "
          + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    header = f"{'GPU':<10}{'peak TFLOP/s':>13}{'windows/s':>11}" + "".join(f"{'cores ' + f:>12}" for f in rates)
    print(header)
    for r in rows:
        print(f"{r['gpu']:<10}{r['peak_tflops']:>13}{r['gpu_windows_per_s']:>11}"
              + "".join(f"{r['cores_' + f.lower()]:>12}" for f in rates))
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
              "flops_per_window": flops, "mfu": args.mfu, "feature_clips_per_s_per_core": rates, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

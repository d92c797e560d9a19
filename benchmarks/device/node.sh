#!/usr/bin/env bash
# On the GPU machine (the device tool's `run`, with carry [".device"]): unpack the bundle that
# bundle.sh built, then run the one-node benchmark (the job, the model-only bound and the DataLoader
# script on the same corpus) and put its result and logs under $OUT. Arguments go to benchmarks.node
# (default there with CUDA: 6,000 files, full-size models, precision auto).
# Usage: bash benchmarks/device/node.sh [--files 6000] [--skip dataloader] [--features-on gpu] ...
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site "$OUT"
start=$(date +%s)
xz -dc .device/site.tar.xz | tar -C /tmp/site -xf - || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
echo "unpacked in $(( $(date +%s) - start )) s"
{ nvidia-smi; nproc; free -g; python3 -c "import torch, transformers, ray, deltalake; print(torch.__version__, transformers.__version__, ray.__version__, deltalake.__version__)"; } > "$OUT/machine.txt" 2>&1
python3 -m benchmarks.node --workdir /tmp/node --out "$OUT/node.json" "$@" 2>&1 | tee "$OUT/node.log"
rc=${PIPESTATUS[0]}
tar -C /tmp -czf "$OUT/ray-logs.tar.gz" ray/session_latest/logs 2>/dev/null || true
echo "benchmarks.node exited $rc after $(( $(date +%s) - start )) s"
exit "$rc"

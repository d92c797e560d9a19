#!/usr/bin/env bash
# Build .device/site.tar.xz: the Python packages the GPU node benchmark needs that the device image
# (python3 3.12, torch 2.11 CUDA, pyarrow, pandas, fsspec, numpy, transformers 5.17) lacks, as cp312
# manylinux wheels unpacked into one folder. Run here (it downloads); the device has no registry.
# Ray's Java jars, RLlib, Serve, LLM and the dashboard's web build are dropped and its binaries stripped
# of debug symbols, to stay inside the 64 MiB a device call carries. Usage: benchmarks/device/bundle.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
out=.device
rm -rf "$out/whl" "$out/site" && mkdir -p "$out/whl" "$out/site"
# what the image lacks, at the versions constraints.txt pins (the ones the tests ran with)
names="ray deltalake arro3-core deprecated soundfile soxr cffi pycparser transformers jsonschema
       jsonschema-specifications referencing rpds-py"
pkgs=()
for n in $names; do
  pin=$(grep -i "^$n==" constraints.txt) || { echo "no pin for $n in constraints.txt" >&2; exit 2; }
  pkgs+=("$pin")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$out/whl" "${pkgs[@]}"
for w in "$out"/whl/*.whl; do unzip -q -o "$w" -d "$out/site"; done
rm -rf "$out"/site/ray/{jars,rllib,serve,llm,dashboard/client/build}
strip --strip-unneeded "$out/site/ray/_raylet.so" "$out/site/ray/core/src/ray/raylet/raylet" \
  "$out/site/ray/core/src/ray/gcs/gcs_server"
tar -C "$out/site" -cf - . | xz -9 -T0 > "$out/site.tar.xz"
rm -rf "$out/whl" "$out/site"
ls -l "$out/site.tar.xz"

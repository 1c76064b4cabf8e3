#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine (see docs/benchmarks.md).
# Uses the machine's own python3/PyTorch; writes JSON and logs to $OUT (or ./outputs/gpu).
set -uo pipefail
OUT="${OUT:-outputs/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PY:-python3}"
nvidia-smi -L | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
run() { local name=$1; shift; echo "== $name: $*"; timeout 150 $PY bench/bench_core.py --device cuda --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log"; }
run tiny_fp32 --preset tiny --batch 128
run tiny_bf16 --preset tiny --batch 128 --dtype bfloat16
run small32_bf16 --preset small --image-size 32 --channels 3 --batch 128 --dtype bfloat16 --sample-count 2048
run base32_bf16 --preset base --image-size 32 --channels 3 --batch 64 --dtype bfloat16 --sample-count 1024
[ "${DEMO:-1}" = 0 ] && exit 0  # DEMO=0: the bench rows only
echo "== core demo on digits (default profile) on the GPU"
timeout 200 $PY -m cafm_core.demo --device cuda --output "$OUT/demo" 2>&1 | tail -12 | tee "$OUT/demo.log"
cp "$OUT/demo/samples.png" "$OUT/demo_samples.png" 2>/dev/null || true
rm -rf "$OUT/demo/fm" "$OUT/demo/cafm"

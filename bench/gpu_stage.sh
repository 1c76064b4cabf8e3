#!/usr/bin/env bash
# The pipeline's training stage on a lent GPU machine: FM then CAFM on digits through
# tasks.train.driver (Ray Train, Accelerate on CUDA, bf16), two GPU workers if there are two
# GPUs, else one. Uses the machine's own python3 with PyTorch (CUDA), Ray, Accelerate and the
# project's other dependencies; writes logs and results.json to $OUT (or ./outputs/gpu-stage).
#   bash bench/gpu_stage.sh                 # about 3-5 minutes on one H200
#   PY=.venv/bin/python DEVICE=cpu STEPS=20 bash bench/gpu_stage.sh   # the same path on a CPU (dry run: 2 min here)
set -uo pipefail
OUT="${OUT:-outputs/gpu-stage}"
PY="${PY:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0
[ "${DEVICE:-cuda}" = cuda ] && nvidia-smi -L | tee "$OUT/device.txt"
missing=$($PY - <<'PY'
import importlib.util as u
print(" ".join(m for m in ("torch", "ray", "accelerate", "safetensors", "pyarrow", "fsspec", "sklearn", "scipy")
               if u.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
    echo "missing on this machine: $missing (install the project's dependencies: pip install -e . with its CUDA torch)" | tee "$OUT/error.txt"
    exit 2
fi
timeout 540 $PY - "$OUT" <<'PY' 2>&1 | tee "$OUT/stage.log"
import json, os, sys, tempfile, time
from pathlib import Path

import torch

from cafm_core.data import load_builtin
from flows.params import PipelineParams
from tasks.pipeline_stages import model_config_for
from tasks.train.driver import run_cafm, run_flow_matching
from tests.integration.test_ray_train import write_shards

out = Path(sys.argv[1])
gpu = os.environ.get("DEVICE", "cuda") == "cuda"
steps = int(os.environ.get("STEPS", "2000"))
workers = 2 if gpu and torch.cuda.device_count() >= 2 else 1
scratch = Path(tempfile.mkdtemp())
dataset = load_builtin("digits", seed=0)
shards = write_shards(dataset, scratch / "shards", 2 * workers, fixed_size=True)
manifest = {"kind": "image", "sample_shape": list(dataset.data.shape[1:]), "num_classes": dataset.num_classes}
params = PipelineParams()  # the main job's model and stage settings; steps and batch sized for a GPU
model = model_config_for(params.model.model_dump(), manifest)
common = dict(shard_urls=shards, sample_shape=tuple(dataset.data.shape[1:]), num_classes=dataset.num_classes,
              num_workers=workers, cpus_per_worker=4 if gpu else 1, use_gpu=gpu, mixed_precision="bf16",
              checkpoint_every=max(steps // 4, 1), storage_path=str(scratch / "ray"))
batch = 256 if gpu else 32
results = {"workers": workers, "device": torch.cuda.get_device_name() if gpu else "cpu"}
start = time.perf_counter()
fm = run_flow_matching(model_config=model, output_dir=str(scratch / "fm"), run_name="gpu-fm",
                       fm_config={**params.fm.core_config(0), "steps": steps, "batch_size": batch,
                                  "log_every": max(steps // 8, 1)}, **common)
cafm = run_cafm(init_checkpoint=fm["model_dir"], output_dir=str(scratch / "cafm"), run_name="gpu-cafm",
                cafm_config={**params.cafm.core_config(0), "steps": steps // 2, "batch_size": batch,
                             "log_every": max(steps // 16, 1)}, **common)
for name, result in (("fm", fm), ("cafm", cafm)):
    results[name] = {"seconds": result["seconds"], "steps": result["steps"], "final": result["final_metrics"],
                     "workers": result["workers"]}
results["wall_s"] = time.perf_counter() - start
(out / "results.json").write_text(json.dumps(results, indent=2))
print(f"{results['device']}, {workers} worker(s): FM {fm['steps']} steps in {fm['seconds']:.0f} s, "
      f"CAFM {cafm['steps']} steps in {cafm['seconds']:.0f} s; results in {out / 'results.json'}")
PY

#!/usr/bin/env bash
# The one device check, for a lent GPU machine (an H200 for ~15 minutes in all; see bench/README.md):
#   1. the organism's main job with the model on the GPU (circuits/organism/config.json, device_map "cuda"),
#      timed; its summary, circuit and report come back to compare with a CPU run of the same commit;
#   2. the tiny main job on the GPU (the CI smoke recipe);
#   3. bench/gpu_olmoe.py: the full OLMoE-1B-7B geometry in bf16 (it saves its JSON after every section);
#   4. the same in fp32 (gpu_olmoe_fp32.json).
# Each part has its own time limit (seconds, arguments 1-4) and a failure does not stop the next part;
# PARTS (default "organism tiny gpu") picks the parts, e.g. PARTS="gpu gpu32" bash bench/device_run.sh.
# Packages the machine lacks travel as wheels in .whl/ (bench/README.md says how to fetch them).
set -uo pipefail
t_org=${1:-200} t_tiny=${2:-60} t_gpu=${3:-300} t_gpu32=${4:-300}
parts=" ${PARTS:-organism tiny gpu} "
dev=${DEVICE:-cuda} # DEVICE=cpu: a dry run of this script on a machine without a GPU
out=${OUT:-/tmp/device_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c 'import torch, transformers, nnsight; print("torch", torch.__version__, "transformers",
transformers.__version__, "nnsight", nnsight.__version__)'
} 2>&1 | tee "$out/machine.txt"

mi=(python3 -c 'import sys; from moe_interp.cli import main; sys.exit(main(sys.argv[1:]))')
timed() {  # timed LIMIT NAME CMD...: run, log to $out/NAME.log, print rc and wall seconds
  local limit=$1 name=$2 t0 rc
  shift 2
  t0=$(date +%s%N)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc wall_ms=$((($(date +%s%N) - t0) / 1000000))" | tee -a "$out/times.txt"
  tail -5 "$out/$name.log"
  return "$rc"
}
rm -rf /tmp/run_organism /tmp/run_tiny # a rerun on a machine still held must not find the last run's folders

DEVICE=$dev python3 - <<'EOF'
import json
import os

cfg = json.load(open("circuits/organism/config.json"))
cfg["device_map"] = os.environ["DEVICE"]
json.dump(cfg, open("/tmp/organism_cuda.json", "w"))
cfg = json.load(open("moe_interp/data/locate_tiny.json"))
cfg["device_map"] = os.environ["DEVICE"]
json.dump(cfg, open("/tmp/tiny_cuda.json", "w"))
EOF
if [[ $parts == *" organism "* ]] &&
  timed "$t_org" organism "${mi[@]}" --debug locate organism --config /tmp/organism_cuda.json --out /tmp/run_organism
then # only a finished run is packed
  tar czf "$out/organism.tgz" -C /tmp/run_organism summary.json circuit.json report.md direction.json
fi
[[ $parts == *" tiny "* ]] && timed "$t_tiny" tiny "${mi[@]}" --debug locate tiny:olmoe --config /tmp/tiny_cuda.json --out /tmp/run_tiny
[[ $parts == *" gpu "* ]] && timed "$t_gpu" gpu_olmoe python3 bench/gpu_olmoe.py --device "$dev" --out "$out/gpu_olmoe.json"
[[ $parts == *" gpu32 "* ]] && timed "$t_gpu32" gpu_olmoe_fp32 \
  python3 bench/gpu_olmoe.py --device "$dev" --dtype float32 --out "$out/gpu_olmoe_fp32.json"
exit 0

#!/usr/bin/env bash
# The GPU check, in one call on a GPU machine (each step bounded, so that one failure still leaves the rest):
#   1. tests/test_gpu.py (label actors sharing the GPU, a Ray Train worker on it);
#   2. bench/pseudo_label.py --gpu at 224 px, resnet50, bf16: one actor against its loops (the shards kept in /tmp);
#   3. bench/train.py --gpu, teacher path, then 4. --student, at 224 px, resnet50, bf16;
#   5. bench/e2e.py --gpu: a one-round digits run with use_gpu and a label actor on the GPU against the plain script;
#   6. the pseudo-label stage again with four actors sharing the GPU, while time is left.
# Logs go to $OUT (default gpu-check/); each bench saves its result to $RESULTS (default bench/results/, as on any
# machine) and a copy goes to $OUT/results/, which is what comes back from a lent machine: copy those files into
# bench/results/ and run make bench-table. Where the machine has no package registry, wheels carried in .devwhl/
# are installed first (Ray, WebDataset and what they need beyond the machine's own torch and timm).
#   IMAGES=20000 BUDGET=520 bash bench/gpu_check.sh
#   GPU= SIZE=32 MODEL=resnet10t IMAGES=1000 BATCH=32 STEPS=4 WORKERS=1 bash bench/gpu_check.sh   # dry run on a CPU
set -uo pipefail
OUT=${OUT:-gpu-check}
IMAGES=${IMAGES:-20000}
GPU=${GPU---gpu}          # GPU= (empty) dry-runs the script on a CPU machine
BUDGET=${BUDGET:-520}     # seconds for the whole script
CPUS=${CPUS:-3}           # CPUs per label actor (its decoding runs on them)
SIZE=${SIZE:-224}         # image and model input size of the pseudo-label and training benches
MODEL=${MODEL:-resnet50}
BATCH=${BATCH:-256}       # training images per step
STEPS=${STEPS:-60}        # training steps timed
WORKERS=${WORKERS:-6}     # DataLoader workers of the training stage and its loop
RESULTS=${RESULTS:-bench/results}
if [ -n "$GPU" ]; then USE_GPU=true GPUS_PER_ACTOR=1; else USE_GPU=false GPUS_PER_ACTOR=0; fi
mkdir -p "$OUT" "$RESULTS"
touch "$OUT/.started"
start=$SECONDS
left() { echo $((BUDGET - (SECONDS - start))); }
step() {  # step NAME SECONDS CMD...: runs CMD under a timeout of min(SECONDS, time left), logs to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local t=$(($(left) < limit ? $(left) : limit))
  if [ "$t" -lt 20 ]; then echo "== $name: skipped, $(left) s left" | tee -a "$OUT/summary.txt"; return; fi
  echo "== $name (limit $t s): $*"
  local s=$SECONDS
  timeout -k 5 "$t" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - s)) s" | tee -a "$OUT/summary.txt"
  grep -E '^\{"bench"|passed|failed|error|Error|GPU \(bf16\)|^epochs|test top-1|round' "$OUT/$name.log" | tail -8 \
    | tee -a "$OUT/summary.txt"
}
if [ -d .devwhl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devwhl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
PY=${PY:-python3}
{ nvidia-smi -L 2>&1; nproc; $PY -c 'import sys, torch, torchvision, timm, ray, webdataset, pyarrow
print(sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "timm",
      timm.__version__, "ray", ray.__version__, "webdataset", webdataset.__version__, "pyarrow", pyarrow.__version__,
      "cuda", torch.cuda.is_available())'; } 2>&1 | tee "$OUT/summary.txt"
step tests 150 $PY -m pytest -p no:cacheprovider -q -s -m gpu tests/test_gpu.py
BENCH=(--results "$RESULTS")
step pl_1actor 200 $PY bench/pseudo_label.py $GPU --images "$IMAGES" --image-size "$SIZE" --model "$MODEL" --actors 1 \
  --cpus-per-actor "$CPUS" --shards /tmp/pl-shards "${BENCH[@]}"
step train 120 $PY bench/train.py $GPU --model "$MODEL" --image-size "$SIZE" --loader-workers "$WORKERS" \
  --batch "$BATCH" --steps "$STEPS" "${BENCH[@]}"
step train_student 150 $PY bench/train.py $GPU --student --model "$MODEL" --image-size "$SIZE" \
  --loader-workers "$WORKERS" --batch "$BATCH" --steps "$STEPS" "${BENCH[@]}"
step e2e 300 $PY bench/e2e.py $GPU "${BENCH[@]}"
step pl_4actors 90 $PY bench/pseudo_label.py $GPU --images "$IMAGES" --image-size "$SIZE" --model "$MODEL" --actors 4 \
  --cpus-per-actor "$CPUS" --shards /tmp/pl-shards --skip-loop "${BENCH[@]}"
mkdir -p "$OUT/results"
find "$RESULTS" -name '*.json' -newer "$OUT/.started" -exec cp {} "$OUT/results/" \;
echo "results: $(ls "$OUT/results" | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
echo "total $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"

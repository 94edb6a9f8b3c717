#!/usr/bin/env bash
# The GPU check, in one call on a GPU machine. Each step is bounded (its own limit and what is left of BUDGET), so
# one failure still leaves the rest; the steps are in order of what the GPU issue needs most:
#   bare          bench/gpu_bare.py, outside Ray (no start-up paid): the bare forward of MODEL at SIZE, and what each
#                 decoder feeds it (batched nvJPEG through torchvision and through TorchCodec, the default CPU
#                 backend on one core and on every core), each as a fraction of the bare forward;
#   tests         tests/test_gpu.py: label actors sharing the GPU (bf16 vs the CPU's float32), nvJPEG decoding vs
#                 PIL, a Ray Train worker on the GPU;
#   train         bench/train.py --gpu, teacher path, 224 px, resnet50, bf16: the stage against its hand loop;
#   e2e           bench/e2e.py --gpu: a one-round digits run with use_gpu, against the plain script (the round's
#                 files record the device): the warm runtime, one training actor for teacher and student holding
#                 half the GPU, room for one label actor of the other half, so labeling and evaluation run on the
#                 trainer itself (resources.train_runtime: warm; pipeline/distributed/executor.pool_on_trainer);
#   pl_gpudecode  bench/pseudo_label.py --gpu --decode gpu at 224 px, resnet50: one actor decoding with nvJPEG;
#   pl_tasks      the same actor fed by CPU decode tasks of DECODE_CPUS each on the node's other cores (Ray Data's
#                 decode stage, label_decode: tasks);
#   pl_1actor     the same with the actor's CPU decode threads, against the hand loop with as many decode workers;
#   train_student bench/train.py --gpu --student;
#   pl_4actors    four actors sharing the GPU.
# Each bench saves its result to $RESULTS (default bench/results/, as on any machine). After every step, the logs
# and the result files so far are packed into $OUT/logs.tgz beside $OUT/summary.txt (a lent machine returns at
# most 8 files, and a call cut short still returns them): copy results/ into bench/results/, run make bench-table.
# Where the machine has no package registry, wheels carried in .devwhl/ are installed first (Ray, WebDataset,
# timm and what they need beyond the machine's own torch).
#   BUDGET=390 bash bench/gpu_check.sh
#   PATH=.venv/bin:$PATH GPU= SIZE=32 MODEL=resnet10t IMAGES=1000 BATCH=32 STEPS=4 WORKERS=1 CPUS=1 DECODE_CPUS=1 \
#     BARE_IMAGES=32 BARE_S=1 BUDGET=900 E2E_S=300 bash bench/gpu_check.sh   # CPU dry run (steps call python3)
set -uo pipefail
OUT=${OUT:-gpu-check}
IMAGES=${IMAGES:-10000}
GPU=${GPU---gpu}          # GPU= (empty) dry-runs the script on a CPU machine
BUDGET=${BUDGET:-390}     # seconds for the whole script (a lent machine gives 15 min in all, starts included)
CPUS=${CPUS:-3}           # CPUs per label actor (its decode threads run on them)
DECODE_CPUS=${DECODE_CPUS:-2}  # CPUs per decode task of the pl_tasks step
SIZE=${SIZE:-224}         # image and model input size of the pseudo-label and training benches
MODEL=${MODEL:-resnet50}
BATCH=${BATCH:-256}       # training images per step
STEPS=${STEPS:-30}        # training steps timed
WORKERS=${WORKERS:-6}     # DataLoader workers of the training stage and its loop
BARE_IMAGES=${BARE_IMAGES:-256}  # JPEGs per timed decode call of the bare step
BARE_S=${BARE_S:-4}       # seconds each of the bare step's measurements is timed
E2E_S=${E2E_S:-150}       # seconds for the e2e step (the dry run's CPU pays Ray's start-ups at CPU speed)
VARIANTS=${VARIANTS:-loader}  # the pseudo-label loops: at 224 px the serial loop is the slowest, and long
RESULTS=${RESULTS:-bench/results}
WORK=$(mktemp -d)         # logs and result copies, packed into $OUT/logs.tgz after each step
mkdir -p "$OUT" "$RESULTS" "$WORK/results"
touch "$WORK/.started"
start=$SECONDS
left() { echo $((BUDGET - (SECONDS - start))); }
pack() {
  find "$RESULTS" -name '*.json' -newer "$WORK/.started" -exec cp {} "$WORK/results/" \;
  tar czf "$OUT/logs.tgz" -C "$WORK" --exclude .started .
}
step() {  # step NAME SECONDS CMD...: runs CMD under a timeout of min(SECONDS, time left), logs to NAME.log
  local name=$1 limit=$2
  shift 2
  local t=$(($(left) < limit ? $(left) : limit))
  if [ "$t" -lt 20 ]; then echo "== $name: skipped, $(left) s left" | tee -a "$OUT/summary.txt"; return; fi
  echo "== $name (limit $t s): $*"
  local s=$SECONDS
  timeout -k 5 "$t" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - s)) s" | tee -a "$OUT/summary.txt"
  grep -E '^\{"bench"|passed|failed|^E  |GPU \(bf16\)|nvJPEG|^epochs|test top-1|round|of bare' "$WORK/$name.log" \
    | cut -c1-400 | tail -8 | tee -a "$OUT/summary.txt"
  pack
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
BENCH=(--results "$RESULTS")
PL=(--images "$IMAGES" --image-size "$SIZE" --model "$MODEL" --cpus-per-actor "$CPUS" --shards /tmp/pl-shards)
TRAIN=(--model "$MODEL" --image-size "$SIZE" --loader-workers "$WORKERS" --batch "$BATCH" --steps "$STEPS")
step bare 60 $PY bench/gpu_bare.py $GPU --model "$MODEL" --size "$SIZE" --batch "$BATCH" --images "$BARE_IMAGES" \
  --seconds "$BARE_S" "${BENCH[@]}"
step tests 120 $PY -m pytest -p no:cacheprovider -q -s -m gpu tests/test_gpu.py
step train 100 $PY bench/train.py $GPU "${TRAIN[@]}" "${BENCH[@]}"
WARM=(--set resources.train_runtime=warm)  # the teacher and student in one training actor that shares the GPU
if [ -n "$GPU" ]; then
  WARM+=(--set resources.gpus_per_train_worker=0.5 --set resources.gpus_per_label_actor=0.5)
else  # the dry run takes the same Ray path (warm trainer, pools on it), with a few epochs: its CPU trains slowly
  WARM+=(--executor ray --set teacher.epochs=10 --set teacher.min_steps=0 --set student.epochs=1
         --set student.min_steps=0 --set select.floor=0)
fi
step e2e "$E2E_S" $PY bench/e2e.py $GPU "${WARM[@]}" "${BENCH[@]}"
if [ -n "$GPU" ]; then
  step pl_gpudecode 70 $PY bench/pseudo_label.py $GPU "${PL[@]}" --actors 1 --decode gpu --skip-loop "${BENCH[@]}"
fi
step pl_tasks 70 $PY bench/pseudo_label.py $GPU "${PL[@]}" --actors 1 --decode tasks --decode-cpus "$DECODE_CPUS" \
  --skip-loop "${BENCH[@]}"
step pl_1actor 90 $PY bench/pseudo_label.py $GPU "${PL[@]}" --actors 1 --variants "$VARIANTS" "${BENCH[@]}"
step train_student 110 $PY bench/train.py $GPU --student "${TRAIN[@]}" "${BENCH[@]}"
step pl_4actors 60 $PY bench/pseudo_label.py $GPU "${PL[@]}" --actors 4 --skip-loop "${BENCH[@]}"
echo "results: $(ls "$WORK/results" | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
echo "total $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
pack

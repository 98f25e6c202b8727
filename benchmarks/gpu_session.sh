#!/usr/bin/env bash
# A session's whole device lease in one call (at most ~9.5 minutes): the GPU checks of
# benchmarks/gpu_run.sh and issue 14's models (training/gpu_train.sh), interleaved so that
# the GPU is never shared by a benchmark and a training:
#   1. wheels; 2. the datasets on the CPU cores 4.. while the device-path tests run under
#   JAX on cores 0-3; 3. the six training runs side by side on the GPU, each stopped after
#   what leaves 150 s, then packed; 4. the JAX/PyTorch benchmarks up to the deadline.
# Prepare here: bash benchmarks/gpu_wheels.sh; cp -r ../shared/data/real .real (git-ignored
# through .git/info/exclude); then with the device tool:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".real"], timeout_s=600)
# $OUT gets bench.tar.gz (log.txt, data.log, fit.log, pipeline_*.json; logs.tar.gz: the same
# before the benchmarks) and model_NAME.tar.gz per run (model.keras, model.json, history.json, dataset.json, logs).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
END=$((T0 + ${GPU_SESSION_SECONDS:-550}))
OUT=${OUT:-$PWD/gpu_out}
WORK=/tmp/gpu_session
mkdir -p "$OUT" "$WORK/bench"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
ncpu=$(nproc)
pin() { local cores=$1; shift; if command -v taskset >/dev/null; then taskset -c "$cores" "$@"; else "$@"; fi; }

OUT=$WORK/bench GPU_RUN_STEPS=wheels bash benchmarks/gpu_run.sh || exit 1
# the datasets get at most 240 s (2026-12-04: 399 s for all six before the build was made
# lighter); runs whose dataset is not built by then are not trained
pin "4-$((ncpu - 1))" env GPU_TRAIN_WORKERS=$((ncpu - 4)) timeout 240 bash training/gpu_train.sh data >"$WORK/bench/data.log" 2>&1 &
data=$!
OUT=$WORK/bench GPU_RUN_STEPS=tests pin 0-3 bash benchmarks/gpu_run.sh
wait "$data"; echo "datasets exit status: $? ($(($(date +%s) - T0)) s)" | tee -a "$WORK/bench/log.txt"
tail -n 8 "$WORK/bench/data.log"

secs=$((END - $(date +%s) - 150 - 75))
((secs < 30)) && secs=30
echo "training: $secs s per run ($(($(date +%s) - T0)) s)" | tee -a "$WORK/bench/log.txt"
bash training/gpu_train.sh fit "$secs" >"$WORK/bench/fit.log" 2>&1
echo "training exit status: $? ($(($(date +%s) - T0)) s)" | tee -a "$WORK/bench/log.txt"
tail -n 40 "$WORK/bench/fit.log"
# the models and the logs so far come back even if the benchmarks are cut short
OUT=$OUT bash training/gpu_train.sh pack
tar czf "$OUT/logs.tar.gz" -C "$WORK" bench

OUT=$WORK/bench GPU_RUN_STEPS=bench GPU_RUN_DEADLINE=$((END - 5)) bash benchmarks/gpu_run.sh
tar czf "$OUT/bench.tar.gz" -C "$WORK" bench
echo "session: $(($(date +%s) - T0)) s"

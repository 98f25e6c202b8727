#!/usr/bin/env bash
# Issue 6's GPU check in one command on a device host: NVIDIA GPU, Python 3.12 with JAX and
# PyTorch, no TensorFlow, no network. Prepare the wheels here first (benchmarks/gpu_wheels.sh),
# then, with the `device` tool:  run(command="bash benchmarks/gpu_run.sh", carry=[".whl"],
# timeout_s=590). Everything lands in $OUT: log.txt and pipeline_{jax_pilatus,jax_eiger,torch_pilatus}.json
# (each written after every row, so a step cut short by its time limit keeps what it measured).
#
# Steps, each time-boxed so that the whole run ends inside one call (at most ~8.5 minutes):
#   1. the wheels into /tmp/site (no index), versions and the GPU into the log;
#   2. tests/test_device_path.py under JAX (the device path against the numpy reference on
#      the GPU, PyTorch's fold against JAX's in test_other_backends_give_the_same_fold);
#   3. benchmarks.pipeline under JAX: Pilatus 1M and EIGER2 9M, float32 and bfloat16;
#   4. benchmarks.pipeline under PyTorch (eager): Pilatus 1M, float32.
# float32 means float32: NVIDIA_TF32_OVERRIDE=0 and JAX_DEFAULT_MATMUL_PRECISION=highest keep
# TF32 out of the convolutions (the tests' tolerances are float32's).
#
# GPU_RUN_STEPS (default "wheels tests bench") runs a subset; GPU_RUN_DEADLINE (epoch seconds)
# shortens every step's time box so that the last one ends by then (benchmarks/gpu_session.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
STEPS=" ${GPU_RUN_STEPS:-wheels tests bench} "
# box SECONDS: the step's time box, cut to what is left before GPU_RUN_DEADLINE (at least 1)
box() { local b=$1; if [[ -n ${GPU_RUN_DEADLINE:-} ]]; then local left=$((GPU_RUN_DEADLINE - $(date +%s))); ((left < b)) && b=$left; ((b < 1)) && b=1; fi; echo "$b"; }

export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export NVIDIA_TF32_OVERRIDE=0 JAX_DEFAULT_MATMUL_PRECISION=highest
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch processes share the GPU in step 2
if [[ $STEPS == *" wheels "* ]]; then
step "wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
KERAS_BACKEND=jax python3 -c "import sys, numpy, jax, torch, keras; print(sys.version.split()[0], 'numpy', numpy.__version__, 'jax', jax.__version__, jax.devices(), 'torch', torch.__version__, torch.cuda.is_available(), 'keras', keras.__version__)"
fi

if [[ $STEPS == *" tests "* ]]; then
step "tests under JAX"
KERAS_BACKEND=jax timeout "$(box 150)" python3 -m pytest -q -p no:cacheprovider tests/test_device_path.py
echo "tests exit status: $?"
fi

[[ $STEPS == *" bench "* ]] || exit 0
step "benchmark under JAX: Pilatus 1M"
KERAS_BACKEND=jax timeout "$(box 130)" python3 -m benchmarks.pipeline --presets pilatus-1m --frames 256 --batch 16 \
    --precision float32 bfloat16 --repeats 5 --out-dir /tmp --json "$OUT/pipeline_jax_pilatus.json"
echo "benchmark (jax, pilatus) exit status: $?"

step "benchmark under JAX: EIGER2 9M"
KERAS_BACKEND=jax timeout "$(box 150)" python3 -m benchmarks.pipeline --presets eiger2-9m --eiger-frames 32 --eiger-batch 4 \
    --precision float32 bfloat16 --repeats 5 --out-dir /tmp --json "$OUT/pipeline_jax_eiger.json"
echo "benchmark (jax, eiger) exit status: $?"

step "benchmark under PyTorch (eager): Pilatus 1M"
KERAS_BACKEND=torch timeout "$(box 70)" python3 -m benchmarks.pipeline --presets pilatus-1m --frames 128 --batch 16 \
    --precision float32 --jit off --repeats 3 --out-dir /tmp --json "$OUT/pipeline_torch_pilatus.json"
echo "benchmark (torch) exit status: $?"
step "done"

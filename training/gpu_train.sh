#!/usr/bin/env bash
# Issue 14's models on a device host (one GPU, JAX backend), in three steps that
# benchmarks/gpu_session.sh interleaves with the GPU checks:
#
#   bash training/gpu_train.sh data      # every run's dataset into $RUNS/cache (CPU, a process pool)
#   bash training/gpu_train.sh fit SECS  # every run side by side on the GPU, each stopping after SECS s of training
#   bash training/gpu_train.sh pack      # each run's model, card, history and log into $OUT/model_NAME.tar.gz
#
# The runs are training/recipes/families/*.json, plus white-top-hat without the ccd-1k
# family (the leave-out check), with the real frames from $GPU_TRAIN_IMAGES (default .real,
# a copy of ../shared/data/real carried with the working tree). Convolutions run in TF32
# (JAX's default precision on the GPU); the models are float32.
# GPU_TRAIN_OVERRIDES (a JSON object) overrides recipe keys for every run: a CPU rehearsal
# with '{"synthetic": 1, "epochs": 2, "input_size": [64, 64]}' runs the same steps in minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
RUNS=${GPU_TRAIN_RUNS:-/tmp/gpu_runs}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$RUNS/recipes"
export KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

# name=recipe[:leave-out family]
# in order of priority: the data step builds them in this order
RUN_SPECS=${GPU_TRAIN_SPECS:-"white-top-hat=white-top-hat synthetic-truth=synthetic-truth circularly-symmetric=circularly-symmetric smoothed-gaussian=smoothed-gaussian mixed=mixed white-top-hat-without-ccd-1k=white-top-hat:ccd-1k"}

write_recipes() {
    for spec in $RUN_SPECS; do
        name=${spec%%=*}; rest=${spec#*=}; recipe=${rest%%:*}; leave=""
        [[ $rest == *:* ]] && leave=${rest#*:}
        NAME=$name RECIPE=$recipe LEAVE=$leave IMAGES=${GPU_TRAIN_IMAGES:-.real} OVR=${GPU_TRAIN_OVERRIDES:-{\}} "$PY" - "$RUNS/recipes/$name.json" <<'EOF'
import json, os, sys
r = json.load(open(f"training/recipes/families/{os.environ['RECIPE']}.json"))
if r.get("images"):
    r["images"] = [os.environ["IMAGES"]]
if os.environ["LEAVE"]:
    r["leave_out"] = [os.environ["LEAVE"]]
r["name"] = os.environ["NAME"]
r.update(json.loads(os.environ["OVR"]))
json.dump(r, open(sys.argv[1], "w"), indent=1)
EOF
    done
}

case ${1:-} in
data)
    write_recipes
    args=(); for spec in $RUN_SPECS; do args+=(--config "$RUNS/recipes/${spec%%=*}.json"); done
    "$PY" -m training.data "${args[@]}" --cache "$RUNS/cache" --workers "${GPU_TRAIN_WORKERS:-$(nproc)}" | tee "$RUNS/built.txt"
    ;;
fit)
    secs=${2:?fit needs the seconds of training per run}
    pids=()
    for spec in $RUN_SPECS; do
        name=${spec%%=*}
        # only runs whose dataset the data step finished (it may have been cut short)
        if [[ -f $RUNS/built.txt ]] && ! grep -q "^$RUNS/recipes/$name.json: " "$RUNS/built.txt"; then
            echo "--- $name: no dataset built, not trained"; continue
        fi
        "$PY" -m training.fit --config "$RUNS/recipes/$name.json" --out "$RUNS/$name" --cache "$RUNS/cache" \
            --time-limit "$secs" >"$RUNS/$name.log" 2>&1 &
        pids+=($!)
    done
    status=0
    for p in "${pids[@]}"; do wait "$p" || status=1; done
    for spec in $RUN_SPECS; do [[ -f $RUNS/${spec%%=*}.log ]] && { echo "--- ${spec%%=*}"; tail -n 4 "$RUNS/${spec%%=*}.log"; }; done
    exit $status
    ;;
pack)
    for spec in $RUN_SPECS; do
        name=${spec%%=*}
        [[ -d $RUNS/$name ]] || continue
        cp "$RUNS/$name.log" "$RUNS/$name/fit.log" 2>/dev/null
        skip=(--exclude=backup --exclude=cache)
        [[ -f $RUNS/$name/model.keras ]] && skip+=(--exclude=checkpoints)
        tar czf "$OUT/model_$name.tar.gz" "${skip[@]}" -C "$RUNS" "$name"
    done
    ls -l "$OUT"
    ;;
*)
    echo "usage: bash training/gpu_train.sh data | fit SECONDS | pack" >&2
    exit 2
    ;;
esac

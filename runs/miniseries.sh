#!/bin/bash
# A miniseries: base models at depths 12..26 trained compute-optimally (default tokens:params
# ratio), one row per depth in <base_dir>/<series>_miniseries_results/results.csv, for plots of
# val bpb and CORE against compute.
#
#   bash runs/miniseries.sh [series_name]          # series name default: today, e.g. jan11
#   SKIP_SETUP=1 bash runs/miniseries.sh jan11     # environment, data and tokenizer already there
#
# Knobs (environment): SERIES_NAME, SKIP_SETUP, NPROC_PER_NODE (default 8), WANDB_RUN (default
# <series>_miniseries; each run appends _d<depth>), NANOCHAT_BASE_DIR (default ~/.cache/nanochat).
# Depths already in the results file are skipped, so an interrupted series can be re-run. A depth
# whose training fails is reported and skipped; the script then exits 1 after the others finish.
set -euo pipefail

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"

if [ -z "${SKIP_SETUP:-}" ]; then
    if ! command -v uv &> /dev/null; then
        curl -LsSf https://astral.sh/uv/install.sh | sh
        export PATH="$HOME/.local/bin:$PATH"  # where the installer puts uv
    fi
    [ -d ".venv" ] || uv venv
    uv sync --extra gpu
fi
if [ -f .venv/bin/activate ]; then
    set +u  # activate scripts read unset variables
    source .venv/bin/activate
    set -u
fi
if [ -z "${SKIP_SETUP:-}" ]; then
    python -m nanochat.dataset -n 1000
    python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
fi

SERIES_NAME="${1:-${SERIES_NAME:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}}"
DEPTHS=(12 14 16 18 20 22 24 26)
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
WANDB_RUN="${WANDB_RUN:-${SERIES_NAME}_miniseries}"
RESULTS_DIR="$NANOCHAT_BASE_DIR/${SERIES_NAME}_miniseries_results"
RESULTS_FILE="$RESULTS_DIR/results.csv"
# the parser prints these fields in this order; depth goes first and train_time_sec last
PARSED_COLUMNS="model_dim,num_params,num_scaling_params,num_iterations,tokens_trained,param_data_ratio,val_bpb,core_score"

mkdir -p "$RESULTS_DIR"
if [ ! -f "$RESULTS_FILE" ]; then
    echo "depth,${PARSED_COLUMNS},train_time_sec" > "$RESULTS_FILE"
fi

log() { echo "[$(date '+%Y-%m-%d %H:%M:%S')] $*"; }

# rows per micro-batch per GPU that fit in 80 GB at each depth
device_batch_size() {
    if [ "$1" -ge 28 ]; then echo 8; elif [ "$1" -ge 20 ]; then echo 16; else echo 32; fi
}

log "Miniseries '$SERIES_NAME': depths ${DEPTHS[*]}, results in $RESULTS_FILE"
FAILED=()
for d in "${DEPTHS[@]}"; do
    if cut -d, -f1 "$RESULTS_FILE" | grep -qxF "$d"; then
        log "d$d: already in $RESULTS_FILE, skipping"
        continue
    fi
    TAG="${SERIES_NAME}_miniseries_d${d}"
    LOG_FILE="$RESULTS_DIR/${TAG}_train.log"
    log "d$d: training (tag $TAG, log $LOG_FILE)"
    START_TIME=$(date +%s)
    if ! torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m scripts.base_train -- \
        --depth="$d" --run="${WANDB_RUN}_d${d}" --model-tag="$TAG" \
        --core-metric-every=999999 --core-metric-max-per-task=-1 --sample-every=-1 --save-every=-1 \
        --device-batch-size="$(device_batch_size "$d")" 2>&1 | tee "$LOG_FILE"; then
        log "d$d: training failed, see $LOG_FILE"
        FAILED+=("d$d")
        continue
    fi
    TRAIN_TIME_SEC=$(( $(date +%s) - START_TIME ))
    if ! ROW=$(python runs/parse_train_log.py "$LOG_FILE" --columns="$PARSED_COLUMNS"); then
        FAILED+=("d$d")
        continue
    fi
    echo "${d},${ROW},${TRAIN_TIME_SEC}" >> "$RESULTS_FILE"
    log "d$d: done in ${TRAIN_TIME_SEC}s: ${PARSED_COLUMNS} = ${ROW}"
done

log "Miniseries '$SERIES_NAME' results:"
column -t -s, "$RESULTS_FILE" 2> /dev/null || cat "$RESULTS_FILE"
if [ "${#FAILED[@]}" -gt 0 ]; then
    log "Failed: ${FAILED[*]}"
    exit 1
fi

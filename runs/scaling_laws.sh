#!/bin/bash
# Scaling-law sweep: for each FLOP budget, train base models of several depths on exactly that
# budget (iterations = budget / (FLOPs per token * batch)) and record their final val bpb and CORE,
# so the compute-optimal depth and tokens:params ratio can be fitted per budget. Rows go to
# <base_dir>/scaling_laws_results_<label>/results.csv; (budget, depth) pairs already there are
# skipped, so the sweep can be resumed. Assumes the environment, data and tokenizer exist (see
# runs/speedrun.sh); activates ./.venv when present.
#
#   bash runs/scaling_laws.sh
#
# Knobs (environment): LABEL (default jan26), NPROC_PER_NODE (default 8), WANDB_RUN (default
# scaling_<label>; each run appends _<tag>), NANOCHAT_BASE_DIR (default ~/.cache/nanochat).
# A run that fails is reported and skipped; the script then exits 1 after the others finish.
set -euo pipefail

LABEL="${LABEL:-jan26}"
FLOPS_BUDGETS=(1e18 2.15e18 4.64e18 1e19)  # 4 budgets, evenly spaced in log10 over one decade
DEPTHS=(10 12 14 16 18 20)
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
WANDB_RUN="${WANDB_RUN:-scaling_${LABEL}}"
EVAL_TOKENS=$((100 * 524288))  # 100 batches of the 2^19-token reference batch: a less noisy val bpb

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
if [ -f .venv/bin/activate ]; then
    set +u  # activate scripts read unset variables
    source .venv/bin/activate
    set -u
fi

RESULTS_DIR="$NANOCHAT_BASE_DIR/scaling_laws_results_${LABEL}"
RESULTS_FILE="$RESULTS_DIR/results.csv"
# the parser prints these fields in this order; the budget and depth go first, train_time_sec last
PARSED_COLUMNS="model_dim,params_wte,params_value_embeds,params_lm_head,params_transformer,params_scalars,params_total,num_iterations,tokens_trained,val_bpb,core_score"

mkdir -p "$RESULTS_DIR"
if [ ! -f "$RESULTS_FILE" ]; then
    echo "flops_budget,depth,${PARSED_COLUMNS},train_time_sec" > "$RESULTS_FILE"
fi

log() { echo "[$(date '+%Y-%m-%d %H:%M:%S')] $*"; }

# rows per micro-batch per GPU that fit in 80 GB at each depth (as in runs/miniseries.sh)
device_batch_size() {
    if [ "$1" -ge 28 ]; then echo 8; elif [ "$1" -ge 20 ]; then echo 16; else echo 32; fi
}

log "Scaling-law sweep '$LABEL': budgets ${FLOPS_BUDGETS[*]}, depths ${DEPTHS[*]}, results in $RESULTS_FILE"
FAILED=()
for flops in "${FLOPS_BUDGETS[@]}"; do
    for d in "${DEPTHS[@]}"; do
        if cut -d, -f1,2 "$RESULTS_FILE" | grep -qxF "${flops},${d}"; then
            log "${flops} d${d}: already in $RESULTS_FILE, skipping"
            continue
        fi
        TAG="scaling_${flops}_d${d}"
        LOG_FILE="$RESULTS_DIR/${TAG}_train.log"
        log "${flops} d${d}: training (tag $TAG, log $LOG_FILE)"
        START_TIME=$(date +%s)
        if ! torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m scripts.base_train -- \
            --depth="$d" --target-flops="$flops" --target-param-data-ratio=-1 \
            --run="${WANDB_RUN}_${TAG}" --model-tag="$TAG" --eval-tokens="$EVAL_TOKENS" \
            --core-metric-every=999999 --core-metric-max-per-task=-1 --sample-every=-1 --save-every=-1 \
            --device-batch-size="$(device_batch_size "$d")" 2>&1 | tee "$LOG_FILE"; then
            log "${flops} d${d}: training failed, see $LOG_FILE"
            FAILED+=("${flops}_d${d}")
            continue
        fi
        TRAIN_TIME_SEC=$(( $(date +%s) - START_TIME ))
        if ! ROW=$(python runs/parse_train_log.py "$LOG_FILE" --columns="$PARSED_COLUMNS"); then
            FAILED+=("${flops}_d${d}")
            continue
        fi
        echo "${flops},${d},${ROW},${TRAIN_TIME_SEC}" >> "$RESULTS_FILE"
        log "${flops} d${d}: done in ${TRAIN_TIME_SEC}s: ${PARSED_COLUMNS} = ${ROW}"
    done
done

log "Scaling-law sweep '$LABEL' results:"
column -t -s, "$RESULTS_FILE" 2> /dev/null || cat "$RESULTS_FILE"
if [ "${#FAILED[@]}" -gt 0 ]; then
    log "Failed: ${FAILED[*]}"
    exit 1
fi

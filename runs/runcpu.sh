#!/usr/bin/env bash
# The offline quick start: the whole pipeline, tiny, on a CPU (2 cores are enough), in about 10 minutes:
# tokenizer, pretraining, base eval, SFT, chat eval, one chat reply, and the report.
# Needs python3 and pip (for uv) and the package registries; everything else is committed in the repo:
# the pretraining sample (data/pretrain_sample), the CORE eval bundle (data/eval_bundle.zip) and the
# task subsets (data/tasks). Nothing here downloads data.
#
#   bash runs/runcpu.sh                                   # artifacts in ~/.cache/nanochat
#   NANOCHAT_BASE_DIR=/tmp/nc bash runs/runcpu.sh          # ... or in a scratch directory
#
# The result is a tiny model with a high loss: the point is to see every stage run and the report at
# the end ($NANOCHAT_BASE_DIR/report/report.md, also copied to ./report.md). For a real model use
# runs/speedrun.sh on 8 GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export NANOCHAT_OFFLINE="${NANOCHAT_OFFLINE:-1}"     # use the committed data, never the network
export NANOCHAT_COMPILE="${NANOCHAT_COMPILE:-0}"     # torch.compile on CPU needs a C++ compiler; eager is safer
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(python3 -c 'import os; print(os.cpu_count() or 1)')}"
export WANDB_RUN="${WANDB_RUN:-dummy}"
# the stages after a training load the step it ends at, not the last step on disk: a base dir that holds
# a longer earlier run must not hand its model to base_eval, chat_sft or chat_eval
BASE_STEPS="${BASE_STEPS:-60}"
SFT_STEPS="${SFT_STEPS:-30}"
mkdir -p "$NANOCHAT_BASE_DIR"

# environment: uv from pip if missing, then the locked dependencies into .venv
if ! python3 -m uv --version >/dev/null 2>&1 && ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet uv
fi
UV="uv"; command -v uv >/dev/null 2>&1 || UV="python3 -m uv"
$UV sync --locked --inexact --quiet  # --inexact: keep dev tools already in .venv
source .venv/bin/activate

SECONDS=0
stage() { echo; echo "=== [$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }

python -m nanochat.report reset

stage "data: install the committed pretraining sample"
python -m nanochat.dataset --sample

stage "tokenizer: train (vocab 8192) and evaluate"
python -m scripts.tok_train --vocab-size=8192
python -m scripts.tok_eval

stage "pretraining: d4, context 512, 8192 tokens per step"
python -m scripts.base_train --depth=4 --head-dim=64 --window-pattern=L --max-seq-len=512 \
    --device-batch-size=16 --total-batch-size=8192 --num-iterations="$BASE_STEPS" --warmup-steps=5 \
    --eval-every=30 --eval-tokens=65536 --core-metric-every=-1 --sample-every=-1 --run="$WANDB_RUN"

stage "base model evaluation: CORE (16 per task), bpb, samples"
python -m scripts.base_eval --step="$BASE_STEPS" --device-batch-size=16 --split-tokens=65536 --max-per-task=16

stage "SFT: offline chat mixture (identity, Dolly/HH, GSM8K, spelling), context 512"
python -m scripts.chat_sft --model-step="$BASE_STEPS" --max-seq-len=512 --device-batch-size=16 \
    --total-batch-size=8192 --num-iterations="$SFT_STEPS" --eval-every=15 --eval-tokens=32768 \
    --chatcore-every=-1 --run="$WANDB_RUN"

stage "chat evaluation: the six ChatCORE tasks, 16 problems each"
python -m scripts.chat_eval -i sft -s "$SFT_STEPS" -x 16 -m 128 -b 16

stage "chat: one prompt through the CLI"
python -m scripts.chat_cli -i sft -s "$SFT_STEPS" -p "Why is the sky blue?" --max-tokens=64

stage "report"
python -m nanochat.report generate
echo "Quick start finished in $((SECONDS / 60))m$((SECONDS % 60))s; report: $NANOCHAT_BASE_DIR/report/report.md"

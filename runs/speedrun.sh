#!/bin/bash
# The speedrun: train a GPT-2 grade ChatGPT clone end to end on one 8xH100 node, about 3 hours
# in all (base training alone is about 1.65 h on the leaderboard), then write the report card.
#
#   bash runs/speedrun.sh
#   WANDB_RUN=speedrun screen -L -Logfile speedrun.log -S speedrun bash runs/speedrun.sh
#
# Knobs (environment): NANOCHAT_BASE_DIR (default ~/.cache/nanochat), WANDB_RUN (default dummy,
# which disables wandb), NPROC_PER_NODE (default 8 GPUs). Run from the repo root.
set -euo pipefail

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
WANDB_RUN="${WANDB_RUN:-dummy}"

# -----------------------------------------------------------------------------
# Python environment: uv, a .venv, and the locked dependencies (torch comes from PyPI)
if ! command -v uv &> /dev/null; then
    curl -LsSf https://astral.sh/uv/install.sh | sh
    export PATH="$HOME/.local/bin:$PATH"  # where the installer puts uv
fi
[ -d ".venv" ] || uv venv
uv sync --extra gpu
set +u  # activate scripts read unset variables
source .venv/bin/activate
set -u

python -m nanochat.report reset

# -----------------------------------------------------------------------------
# Data and tokenizer. Each shard is ~250M characters (~100 MB). 8 shards (~2B characters) train
# the tokenizer; GPT-2 capability needs about 150 shards, so fetch 170 in the background meanwhile.
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n 170 &
DATASET_DOWNLOAD_PID=$!
python -m scripts.tok_train
python -m scripts.tok_eval

# -----------------------------------------------------------------------------
# Base model: d24 at 8 tokens per scaling parameter, FP8 matmuls
echo "Waiting for the dataset download to finish..."
wait "$DATASET_DOWNLOAD_PID"  # a failed download stops the run here (set -e)
torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m scripts.base_train -- \
    --depth=24 --target-param-data-ratio=8 --device-batch-size=16 --fp8 --run="$WANDB_RUN"
torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m scripts.base_eval -- --device-batch-size=16

# -----------------------------------------------------------------------------
# Chat model: supervised finetuning, with synthetic conversations that teach the model who it is
IDENTITY_FILE="$NANOCHAT_BASE_DIR/identity_conversations.jsonl"
if [ ! -f "$IDENTITY_FILE" ]; then  # via a temp name: an interrupted download leaves no torn file
    curl -fL -o "$IDENTITY_FILE.tmp" https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl
    mv "$IDENTITY_FILE.tmp" "$IDENTITY_FILE"
fi
torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m scripts.chat_sft -- \
    --device-batch-size=16 --run="$WANDB_RUN"
torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m scripts.chat_eval -- -i sft

# Talk to it:  python -m scripts.chat_cli -p "Why is the sky blue?"   or   python -m scripts.chat_web

python -m nanochat.report generate

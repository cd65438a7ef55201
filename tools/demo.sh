#!/usr/bin/env bash
# The demo of the README: set-up, synthetic click-log shards, then a 2-process CPU pretraining
# that prints held-out retrieval results. Extra arguments are config overrides (key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
if [ ! -f data/demo/shards/train/sizes.json ]; then
  .venv/bin/python tools/make_demo_data.py --out data/demo
fi
if [ ! -f data/demo/tokenizer/tokenizer.json ]; then
  .venv/bin/python tools/build_tokenizer.py data/demo/shards/train --out data/demo/tokenizer
fi
rm -rf runs/demo   # the demo always starts fresh
# a free port for the rendezvous: other distributed jobs on this machine may hold 29500 (MASTER_PORT=... overrides)
port=${MASTER_PORT:-$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
start=$(date +%s)
PATH="$PWD/.venv/bin:$PATH" deepspeed --num_gpus 2 --master_port "$port" launch/pretrain.py \
  --config configs/pretrain/demo.yaml --resume never "$@"
echo "[demo] pretraining took $(( $(date +%s) - start )) s; results in runs/demo (metrics.jsonl, eval/, tensorboard/, checkpoints/)"

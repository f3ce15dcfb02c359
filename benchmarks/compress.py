"""Compression benchmark: transform speed on a RoBERTa-base-sized tree, and eval throughput of
a compressed checkpoint against its dense source.

Part 1 builds the parameter tree of `configs/pretrain.py:roberta_base` (12 x 768, vocab 50265;
random normal weights, shapes from the model itself) and times pruning, quantization and
compressed storage (seconds, and true stored bytes against dense fp32).
Part 2 pretrains a small run for a few steps (`--eval_preset`, default width256), compresses it
(int8 and prune50_int4) and times `trainbig eval` on the dense and the compressed checkpoints:
load time (dequantization included) and evaluation examples/s.

  python benchmarks/compress.py [--out_dir=/tmp/x] [--eval_preset=width256] [--skip_transforms]
"""

from __future__ import annotations

import argparse
import os
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
  leaves = dict(prune.flatten_with_paths(params)[0])
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
  all_matrices = (*prune.DEFAULT_INCLUDE, r'embedding$')
  configs = [('int8', None, dict(bits=8), prune.DEFAULT_INCLUDE),
             ('int4', None, dict(bits=4), prune.DEFAULT_INCLUDE),
             ('int4 + embeddings', None, dict(bits=4), all_matrices),
             ('global 90% + int4', masks['global', 0.9], dict(bits=4), prune.DEFAULT_INCLUDE),
             ('layer 50% fp32', masks['layer', 0.5], None, prune.DEFAULT_INCLUDE)]
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


def eval_throughput(out_dir: str, preset: str, steps: int) -> None:
  """Dense vs compressed checkpoints of one run through the same compiled evaluation."""
  from trainbig_jax.evaluate import evaluate_checkpoint
  from trainbig_jax.tasks.mlm import pretrain
  config = pretrain_configs.get_config(preset)
  config.data.vocab_size, config.data.seq_len, config.model.max_len = 8000, 128, 130
  config.data.num_eval_batches = 4
  config.train.batch_size, config.train.total_steps = 32, steps
  config.train.warmup_steps = 1
  run = os.path.join(out_dir, f'run_{preset}')
  pretrain(config, run)
  targets = {'dense': run}
  for name in ('int8', 'prune50_int4'):
    targets[name] = os.path.join(out_dir, f'{preset}_{name}')
    compress_checkpoint(run, compress_configs.get_config(name), targets[name])
  print(f'\nEval of {preset} ({config.model.num_layers} x {config.model.hidden}, seq '
        f'{config.data.seq_len}) on {jax.device_count()} {jax.default_backend()} device(s):')
  print(f'{"checkpoint":<14} {"stored MB":>10} {"load s":>8} {"examples/s":>11} '
        f'{"eval_loss":>10}')
  for name, path in targets.items():
    load_s, _ = timed(lambda: load_checkpoint_params(path)[0])
    result = evaluate_checkpoint(path)
    print(f'{name:<14} {result["stored_bytes"] / 1e6:10.2f} {load_s:8.2f} '
          f'{result["examples_per_s"]:11.1f} {result["eval_loss"]:10.4f}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out_dir', default=None, help='where to write checkpoints (a temp dir)')
  parser.add_argument('--eval_preset', default='width256', help='pretrain preset for part 2')
  parser.add_argument('--eval_steps', type=int, default=5, help='pretraining steps for part 2')
  parser.add_argument('--skip_transforms', action='store_true', help='only part 2')
  args = parser.parse_args()
  out_dir = args.out_dir or tempfile.mkdtemp(prefix='compress_bench_')
  print(f'jax {jax.__version__}, {os.cpu_count()} CPUs, backend {jax.default_backend()}')
  if not args.skip_transforms:
    transform_timings(out_dir)
  eval_throughput(out_dir, args.eval_preset, args.eval_steps)


if __name__ == '__main__':
  main()

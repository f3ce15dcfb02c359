"""Times the compression transforms on a RoBERTa-base-sized fp32 parameter tree.

12 layers, hidden 768, MLP 3072, vocab 50265 (random normal weights; ~125 M params of
which 85 M are prunable layer kernels). Prints seconds per transform and the true
stored bytes versus dense fp32. Runs in well under 3 minutes on 2 CPU cores:

  python benchmarks/compress_transforms.py [--out_dir=/tmp/x]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np

from trainbig_jax.compress import prune, quantize, storage

NUM_LAYERS, HIDDEN, MLP_DIM, VOCAB, MAX_LEN, NUM_CLASSES = 12, 768, 3072, 50265, 514, 3


def roberta_base_params(seed: int = 0) -> dict[str, Any]:
  """fp32 numpy tree laid out like trainbig_jax/models/encoder.py at RoBERTa-base size."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (0.02 * rng.standard_normal(shape, np.float32))
  norm = lambda: {'scale': np.ones(HIDDEN, np.float32), 'bias': np.zeros(HIDDEN, np.float32)}
  dense = lambda i, o: {'kernel': normal(i, o), 'bias': np.zeros(o, np.float32)}
  params = {'embed': {'token': {'embedding': normal(VOCAB, HIDDEN)},
                      'position': {'embedding': normal(MAX_LEN, HIDDEN)}, 'norm': norm()}}
  for i in range(NUM_LAYERS):
    params[f'layers_{i}'] = {
        'attention': {n: dense(HIDDEN, HIDDEN) for n in ('query', 'key', 'value', 'out')},
        'attention_norm': norm(),
        'mlp': {'wi': dense(HIDDEN, MLP_DIM), 'wo': dense(MLP_DIM, HIDDEN)}, 'mlp_norm': norm()}
  params['mlm_head'] = {'dense': dense(HIDDEN, HIDDEN), 'norm': norm(),
                        'bias': np.zeros(VOCAB, np.float32)}
  params['classifier'] = {'dense': dense(HIDDEN, HIDDEN), 'out': dense(HIDDEN, NUM_CLASSES)}
  return params


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  result = jax.block_until_ready(fn())
  return time.perf_counter() - start, result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out_dir', default=None, help='where to write checkpoints (a temp dir)')
  args = parser.parse_args()
  out_dir = args.out_dir or tempfile.mkdtemp(prefix='compress_bench_')

  params = roberta_base_params()
  total = sum(x.size for x in jax.tree.leaves(params))
  leaves = dict(prune.flatten_with_paths(params)[0])
  prunable = sum(leaves[p].size for p in prune.prunable_paths(params))
  print(f'RoBERTa-base-sized tree: {total / 1e6:.1f} M params, {prunable / 1e6:.1f} M prunable '
        f'(jax {jax.__version__}, {os.cpu_count()} CPUs, backend {jax.default_backend()})')
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


if __name__ == '__main__':
  main()

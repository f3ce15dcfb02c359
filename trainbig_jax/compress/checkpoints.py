"""Checkpoint in, compressed checkpoint out: the `trainbig compress` command.

A compressed checkpoint folder holds:
  config.json, tokenizer.model   copied from the source run, so eval needs nothing else
  compressed/                    manifest.json + arrays/ (Orbax): packed integer codes,
                                 scales, zero points and pruning masks (see storage.py)
It is staged in a hidden sibling folder and renamed into place only when complete: a failure
leaves no output folder at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from trainbig_jax.compress import prune, quantize, storage
from trainbig_jax.models.layout import flatten_with_paths
from trainbig_jax.train import checkpoint

COMPRESSED_DIR = 'compressed'
PRUNE_METHODS = ('magnitude', 'heads', 'neurons')
GRANULARITIES = ('per_channel', 'per_tensor')


def is_compressed_checkpoint(path: str | os.PathLike) -> bool:
  return (Path(path) / COMPRESSED_DIR / storage.MANIFEST_FILE).exists()


def check_compress_config(c: ml_collections.ConfigDict) -> None:
  s = c.prune.sparsity
  if not (isinstance(s, (int, float)) and 0.0 <= s < 1.0):
    raise ValueError(f'prune.sparsity={s!r} is invalid: allowed [0, 1).')
  if c.prune.method not in PRUNE_METHODS:
    raise ValueError(f'prune.method={c.prune.method!r} is invalid; allowed: '
                     f'{", ".join(PRUNE_METHODS)}.')
  if c.prune.scope not in prune.SCOPES:
    raise ValueError(f'prune.scope={c.prune.scope!r} is invalid; allowed: '
                     f'{", ".join(prune.SCOPES)}.')
  quantize.check_setting_bits(c.quant.bits)
  if c.quant.granularity not in GRANULARITIES:
    raise ValueError(f'quant.granularity={c.quant.granularity!r} is invalid; allowed: '
                     f'{", ".join(GRANULARITIES)}.')


def pruning_masks(params: Any, c: ml_collections.ConfigDict, num_heads: int) -> Any | None:
  """The mask tree the config asks for, or None when nothing is pruned."""
  p = c.prune
  if p.sparsity == 0:
    return None
  include, exclude = tuple(p.include), tuple(p.exclude)
  if p.method == 'magnitude':
    return prune.magnitude_masks(params, p.sparsity, scope=p.scope, include=include,
                                 exclude=exclude)
  # Structured pruning selects whole blocks; include/exclude filter the layers.
  layers = tuple(rx.split('/')[0] for rx in include)
  if p.method == 'heads':
    return prune.head_masks(params, num_heads, p.sparsity, include=layers, exclude=exclude)
  return prune.neuron_masks(params, p.sparsity, include=layers, exclude=exclude)


def compress_params(params: Any, c: ml_collections.ConfigDict, num_heads: int
                    ) -> storage.CompressedParams:
  check_compress_config(c)
  masks = pruning_masks(params, c, num_heads)
  quant = None
  if c.quant.bits != quantize.FLOAT_BITS:
    quant = dict(bits=c.quant.bits, symmetric=c.quant.symmetric,
                 per_channel=c.quant.granularity == 'per_channel')
  # Selecting what to quantize also validates the patterns (a pattern matching nothing fails).
  return storage.compress_tree(params, masks, quant, include=tuple(c.quant.include),
                               exclude=tuple(c.quant.exclude))


def compress_checkpoint(run_dir: str | os.PathLike, c: ml_collections.ConfigDict,
                        out: str | os.PathLike) -> dict[str, Any]:
  """Compresses the parameters of `run_dir` into the new folder `out`; returns a summary."""
  out = Path(out).absolute()
  if out.exists():
    raise FileExistsError(f'--out={out} already exists; choose a new folder (nothing was '
                          f'written).')
  check_compress_config(c)
  if not Path(run_dir).exists():
    raise checkpoint.CheckpointError(f'--checkpoint={run_dir} does not exist.')
  run_config = checkpoint.read_config(run_dir)
  params = checkpoint.restore_params(run_dir)
  compressed = compress_params(params, c, run_config.model.num_heads)
  dense = storage.decompress_tree(compressed)
  sizes = storage.stored_bytes(compressed)
  selected = set(prune.select_paths(list(sizes['per_leaf']), tuple(c.prune.include),
                                    tuple(c.prune.exclude)))
  summary = {
      'source': str(Path(run_dir).absolute()),
      'compression': json.loads(c.to_json()),
      **{k: v for k, v in sizes.items() if k != 'per_leaf'},
      # The matrices the config selected, alone: what pruning + quantization really saves.
      'selected_stored_bytes': sum(sizes['per_leaf'][p]['total'] for p in selected),
      'selected_dense_fp32_bytes': sum(sizes['per_leaf'][p]['dense_fp32']
                                       for p in selected),
      **_nonzero_counts(dense, c),
  }
  out.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
  try:
    storage.save_compressed(staging / COMPRESSED_DIR, compressed, manifest_extra=summary)
    shutil.copyfile(Path(run_dir) / checkpoint.CONFIG_FILE, staging / checkpoint.CONFIG_FILE)
    shutil.copyfile(Path(run_dir) / checkpoint.TOKENIZER_FILE,
                    staging / checkpoint.TOKENIZER_FILE)
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  summary['out'] = str(out)
  return summary


def _nonzero_counts(params: Any, c: ml_collections.ConfigDict) -> dict[str, Any]:
  """Nonzero weights overall and within the selected (prunable) matrices."""
  leaves = dict(flatten_with_paths(params)[0])
  selected = prune.select_paths(list(leaves), tuple(c.prune.include), tuple(c.prune.exclude))
  count = lambda names: sum(int(np.count_nonzero(leaves[n])) for n in names)
  size = lambda names: sum(int(np.size(leaves[n])) for n in names)
  return {'total_params': size(leaves), 'nonzero_params': count(leaves),
          'selected_params': size(selected), 'selected_nonzero_params': count(selected)}


def load_checkpoint_params(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
  """(dense params, storage facts) of a run folder or a compressed checkpoint folder."""
  if is_compressed_checkpoint(path):
    params, manifest = storage.load_compressed(Path(path) / COMPRESSED_DIR)
    facts = {'checkpoint_kind': 'compressed', **manifest['totals']}
    facts['stored_bytes'] = facts.pop('compressed_bytes')
    return params, facts
  params = checkpoint.restore_params(path)
  dense_bytes = sum(4 * int(np.size(x)) for _, x in flatten_with_paths(params)[0])
  return params, {'checkpoint_kind': 'dense', 'stored_bytes': dense_bytes,
                  'dense_fp32_bytes': dense_bytes}

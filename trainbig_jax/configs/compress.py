"""Compression presets: pruning and/or k-bit weight quantization of a checkpoint.

Usage: trainbig compress --checkpoint=RUN --config=configs/compress.py:PRESET --out=DIR
       [--config.prune.sparsity=0.7 --config.quant.bits=4 --config.quant.granularity=per_tensor
        --config.prune.scope=global --config.prune.include='("layers_.*/kernel$",)' ...]

Preset names compose the paper's sweeps:
  dense                        nothing removed; stored as fp32 (the reference point)
  prune{0,10,...,90}           unstructured magnitude pruning, layer-wise, at that percentage
  int{8,6,4,3,2}               round-to-nearest weight quantization, per output channel
  prune{S}_int{B}              both (pruned weights are quantized after pruning)
  prune{S}_global              one threshold across all selected matrices
  heads{S} / neurons{S}        structured pruning of whole attention heads / MLP neurons
By default only the dense kernels inside the transformer layers are compressed (embeddings,
biases and LayerNorm stay fp32), as in the paper.
"""

import re

import ml_collections

from trainbig_jax.models.layout import LAYER_KERNELS

SPARSITY_GRID = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90)
BITS_GRID = (8, 6, 4, 3, 2)

_PRESET = re.compile(
    r'^(?:dense|(?:(?P<kind>prune|heads|neurons)(?P<sparsity>\d+)(?P<global>_global)?)?'
    r'(?:_?int(?P<bits>\d))?)$')


def get_config(preset: str = 'prune50_int4') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.prune = ml_collections.ConfigDict()
  c.prune.sparsity = 0.0  # fraction of the selected weights set to zero, in [0, 1)
  c.prune.method = 'magnitude'  # 'magnitude' | 'heads' | 'neurons'
  c.prune.scope = 'layer'  # 'layer': each matrix to the target; 'global': one threshold
  c.prune.include = LAYER_KERNELS
  c.prune.exclude = ()
  c.quant = ml_collections.ConfigDict()
  c.quant.bits = 32  # 32: not quantized (float32); 2..8 bits otherwise
  c.quant.symmetric = True
  c.quant.granularity = 'per_channel'  # 'per_channel' (output channel) | 'per_tensor'
  c.quant.include = LAYER_KERNELS
  c.quant.exclude = ()

  match = _PRESET.match(preset)
  if not match or preset == '':
    raise ValueError(f'Unknown compress preset {preset!r}; allowed: dense, prune<S>, int<B>, '
                     f'prune<S>_int<B>, prune<S>_global, heads<S>, neurons<S> with S in '
                     f'{SPARSITY_GRID} and B in {BITS_GRID}.')
  if match['sparsity'] is not None:
    c.prune.sparsity = int(match['sparsity']) / 100
    c.prune.method = 'magnitude' if match['kind'] == 'prune' else match['kind']
    if match['global']:
      c.prune.scope = 'global'
  if match['bits'] is not None:
    c.quant.bits = int(match['bits'])
  return c


def preset_names() -> list[str]:
  """Every preset of the paper's sweeps (for listings and tests)."""
  names = ['dense'] + [f'prune{s}' for s in SPARSITY_GRID] + [f'int{b}' for b in BITS_GRID]
  names += [f'prune{s}_int{b}' for s in SPARSITY_GRID for b in BITS_GRID]
  return names

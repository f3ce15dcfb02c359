"""Stacked (scanned) <-> per-layer parameter trees of a layer stack.

A model trained with `model.scan_layers=True` stores its layers as one subtree `layers` whose
leaves have a leading axis of size num_layers; without it, as `layers_0`, `layers_1`, ....
The two hold the same numbers: `stack_layers` and `unstack_layers` convert exactly (pure
numpy/jax on pytrees, any leaf type that supports indexing and stacking). Checkpoints are
read per-layer for evaluation, compression and fine-tuning (`checkpoint.restore_params`), so
every matrix a compression regex names ('layers_3/mlp/wi/kernel', models/layout.py
LAYER_KERNELS) exists whatever the run's layout was. The stack is the top-level one of the
encoder; a model family with nested stacks ('encoder/layers') would convert each subtree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

STACKED = 'layers'
_PER_LAYER = re.compile(r'layers_(\d+)$')


class LayoutError(ValueError):
  """A parameter tree mixes or breaks the stacked and per-layer layouts."""


def is_stacked(params: Mapping[str, Any]) -> bool:
  return STACKED in params


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """`layers/...[L, ...]` -> `layers_0/...`, ..., `layers_{L-1}/...`; other entries unchanged.

  A tree that is already per-layer is returned as it is.
  """
  if not is_stacked(params):
    return dict(params)
  if any(_PER_LAYER.match(k) for k in params):
    raise LayoutError('the parameter tree has both stacked "layers" and per-layer "layers_i".')
  stacked = params[STACKED]
  sizes = {np.shape(x)[0] for x in jax.tree.leaves(stacked)}
  if len(sizes) != 1:
    raise LayoutError(f'stacked layer parameters disagree on the number of layers: {sizes}.')
  num_layers = sizes.pop()
  out = {k: v for k, v in params.items() if k != STACKED}
  for i in range(num_layers):
    out[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """`layers_0/...`, ..., `layers_{L-1}/...` -> `layers/...[L, ...]`; others unchanged.

  A tree that is already stacked is returned as it is.
  """
  if is_stacked(params):
    return dict(params)
  indices = sorted(int(m.group(1)) for k in params if (m := _PER_LAYER.match(k)))
  if indices != list(range(len(indices))):
    raise LayoutError(f'per-layer parameters are not numbered 0..L-1: {indices}.')
  if not indices:
    return dict(params)
  layers = [params[f'layers_{i}'] for i in indices]
  out = {k: v for k, v in params.items() if not _PER_LAYER.match(k)}
  try:
    out[STACKED] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
  except ValueError as e:
    raise LayoutError(f'per-layer parameter trees differ between layers: {e}') from None
  return out


def to_layout(params: Mapping[str, Any], scanned: bool) -> dict[str, Any]:
  """The tree in the layout a model built with `scan_layers=scanned` expects."""
  return stack_layers(params) if scanned else unstack_layers(params)


def per_layer_model_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a `model` config section that builds the per-layer layout (no scan).

  Evaluation and fine-tuning use it: the outputs are the same, and compression-aware
  fine-tuning (pruning masks, QAT) selects kernels per layer by name.
  """
  m = ml_collections.ConfigDict(model_config.to_dict())
  if 'scan_layers' in m:
    m.scan_layers = False
  return m

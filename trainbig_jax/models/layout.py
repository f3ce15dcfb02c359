"""Parameter-tree layout shared by every model family and by compression.

A parameter is named by its '/'-joined path ('layers_0/mlp/wi/kernel'); `path_str` is the one
way to write it. `LAYER_KERNELS` selects (by re.search) the dense kernels inside the
transformer layers, what pruning, quantization and their compression-aware training touch by
default: embeddings, biases, LayerNorm and task heads stay dense unless a config includes
them. Because the pattern is searched, it also matches layers nested under a prefix, such as
an encoder-decoder's 'encoder/layers_0/...' and 'decoder/layers_0/...'; a model family whose
layers are named otherwise adds its pattern here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

LAYER_KERNELS: tuple[str, ...] = (r'layers_\d+/.*/kernel$',)
# The token embedding (tied to the output projection) of each model family, by task: what a
# sweep quantizes with the layer kernels when it quantizes embeddings.
TOKEN_EMBEDDING = {'classify': r'embed/token/embedding$',
                   'translate': r'shared_embedding/embedding$'}


def path_str(key_path: Sequence[Any]) -> str:
  """'/'-joined key names of a `jax.tree_util` key path ('layers_0/mlp/wi/kernel')."""
  return jax.tree_util.keystr(tuple(key_path), simple=True, separator='/')


def flatten_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None
                       ) -> tuple[list[tuple[str, Any]], Any]:
  """(path, leaf) pairs in tree order plus the treedef to rebuild the tree."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_str(kp), leaf) for kp, leaf in flat], treedef

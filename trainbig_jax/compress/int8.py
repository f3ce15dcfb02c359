"""int8 inference: Dense layers as int8 x int8 -> int32 matmuls (`trainbig eval --int8`).

The dequantize path (`storage.load_compressed`) expands codes back to float32 kernels and
runs float matmuls: smaller files, same speed. Here the selected Dense kernels stay int8
codes with per-output-channel float scales (a symmetric quantized checkpoint's own codes;
float kernels are quantized to 8 bits per channel at load), and each Dense input is
quantized per row on the fly (dynamic quantization: scale = max|x| / 127 over the features
of each token). One `lax.dot_general` with preferred_element_type=int32 accumulates exactly;
the result is rescaled by row scale x channel scale, and the bias is added in float:

  y[t, o] = (sum_i xq[t, i] * wq[i, o]) * sx[t] * sw[o] + b[o]

Model code is untouched: `nn.intercept_methods` reroutes the `__call__` of every Dense whose
kernel has int8 codes, and the float parameter tree passed to `apply` simply lacks those
kernels (never read).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from trainbig_jax.compress import prune, quantize, storage
from trainbig_jax.compress.checkpoints import COMPRESSED_DIR, is_compressed_checkpoint
from trainbig_jax.models.layout import LAYER_KERNELS

PyTree = Any
INT8_MAX = 127


@flax.struct.dataclass
class Int8Kernel:
  """codes: int8 [in, out] in [-127, 127]; scale: float32 [out] (kernel ~ codes * scale)."""
  codes: jax.Array
  scale: jax.Array


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 codes of x per row (last axis), and the row scales [..., 1]."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / INT8_MAX
  scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero row is exact with any scale
  codes = jnp.clip(jnp.round(x / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return codes, scale


def int8_matmul(x: jax.Array, kernel: Int8Kernel) -> jax.Array:
  """x [..., in] @ kernel [in, out] as an int8 x int8 -> int32 matmul; float32 result."""
  codes, row_scale = quantize_rows(x)
  acc = jax.lax.dot_general(codes, kernel.codes, (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * row_scale * kernel.scale


def kernel_from_quantized(q: quantize.QuantizedTensor) -> Int8Kernel | None:
  """The int8 kernel of a symmetric code tensor of 2..8 bits with one scale per output
  channel (or per tensor); None for anything else (asymmetric codes, other axes)."""
  if not q.symmetric or len(q.shape) != 2 or q.channel_axis not in (None, 1):
    return None
  scale = np.broadcast_to(np.asarray(q.scale, np.float32).reshape(1, -1), (1, q.shape[1]))
  return Int8Kernel(codes=np.asarray(q.values, np.int8), scale=scale.reshape(-1).copy())


def kernel_from_float(w: Any) -> Int8Kernel:
  """8-bit symmetric per-output-channel quantization of a float [in, out] kernel."""
  q = quantize.quantize(np.asarray(w, np.float32), 8, symmetric=True, per_channel=True)
  return kernel_from_quantized(q)


def int8_kernels(params: PyTree, checkpoint_path: str | os.PathLike | None = None,
                 include=LAYER_KERNELS, exclude=()) -> tuple[PyTree, dict[str, Int8Kernel]]:
  """(params without the int8 kernels, {kernel path: Int8Kernel}).

  The selected 2-D kernels (default: the layers' Dense kernels, as compression selects
  them) become int8: from the compressed checkpoint at `checkpoint_path` where it stores
  symmetric codes, otherwise quantized here to 8 bits per channel.
  """
  stored = {}
  if checkpoint_path is not None and is_compressed_checkpoint(checkpoint_path):
    compressed, _ = storage.read_compressed(os.path.join(checkpoint_path, COMPRESSED_DIR))
    stored = storage.quantized_leaves(compressed)
  named, treedef = prune.flatten_with_paths(params)
  selected = set(prune.select_paths([p for p, _ in named], include, exclude))
  kernels, kept = {}, []
  for path, leaf in named:
    kernel = None
    if path in selected and path.endswith('kernel') and np.ndim(leaf) == 2:
      kernel = kernel_from_quantized(stored[path]) if path in stored else None
      kernel = kernel if kernel is not None else kernel_from_float(leaf)
    if kernel is None:
      kept.append((path, leaf))
    else:
      kernels[path] = kernel
  return _nest(kept), kernels


def _nest(named: list[tuple[str, Any]]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in named:
    *parents, last = path.split('/')
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[last] = value
  return tree


def int8_interceptor(kernels: dict[str, Int8Kernel]):
  """A `nn.intercept_methods` interceptor running the Dense layers of `kernels` in int8."""
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, nn.Dense):
      return next_fun(*args, **kwargs)
    kernel = kernels.get('/'.join(module.path) + '/kernel')
    if kernel is None:
      return next_fun(*args, **kwargs)
    (x,) = args
    y = int8_matmul(x, kernel)
    if module.use_bias:
      y = y + module.get_variable('params', 'bias')
    return y.astype(module.dtype or x.dtype)
  return intercept


def int8_sums(sums_fn: Callable) -> Callable:
  """A sums function of (params, int8 kernels) from one of float params (train/steps.py)."""
  def sums(params_and_kernels, batch, rng, train):
    params, kernels = params_and_kernels
    with nn.intercept_methods(int8_interceptor(kernels)):
      return sums_fn(params, batch, rng, train)
  return sums


def int8_eval_inputs(params: PyTree, shardings: PyTree, sums_fn: Callable, mesh,
                     checkpoint_path: str | os.PathLike | None = None):
  """(params, shardings, sums_fn) of an evaluation made int8: params become (float params
  without the int8 kernels, int8 kernels), the kernels replicated over `mesh`."""
  kept, kernels = int8_kernels(params, checkpoint_path)
  kept_paths = {path for path, _ in prune.flatten_with_paths(kept)[0]}
  named_shardings = prune.flatten_with_paths(shardings)[0]
  kept_shardings = _nest([(p, s) for p, s in named_shardings if p in kept_paths])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  kernel_shardings = {p: Int8Kernel(codes=replicated, scale=replicated) for p in kernels}
  return (kept, kernels), (kept_shardings, kernel_shardings), int8_sums(sums_fn)

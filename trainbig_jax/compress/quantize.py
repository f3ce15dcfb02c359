"""Uniform round-to-nearest weight quantization (2..8 bits) as pure functions on trees.

Symmetric: q in [-(2^(b-1)-1), 2^(b-1)-1], x ~ q * scale, scale = max|x| / qmax.
Asymmetric: q in [0, 2^b - 1], x ~ (q - zero_point) * scale, over the range
[min(x, 0), max(x, 0)]. The range always includes 0 (as in TFLite/PyTorch) so that
0.0, and hence every pruned weight, is represented exactly; an all-positive tensor
therefore uses [0, max]. Either way every element inside the range is within half a
step (scale / 2) of its dequantized value.

Per-channel statistics reduce over every axis except `channel_axis` (the last, i.e.
the output features of an [in, out] kernel). Tensors with fewer than 2 dimensions
are always quantized per tensor: one scale per element would cost more than it saves.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from trainbig_jax.compress.prune import DEFAULT_INCLUDE, flatten_with_paths, select_paths

PyTree = Any
MIN_BITS, MAX_BITS = 2, 8


@flax.struct.dataclass
class QuantizedTensor:
  """Integer codes plus the affine parameters that map them back to floats.

  values: integer codes with the original shape; int8 when symmetric, uint8 otherwise.
  scale: float32, broadcastable to values (keepdims shape: [1, .., C, .., 1] per channel,
    all ones per tensor); never zero (all-zero channels get scale 1).
  zero_point: int32, same shape as scale; all zeros when symmetric.
  bits, symmetric, channel_axis (non-negative axis, None = per tensor) and dtype (name
  of the original float dtype) are static metadata, not pytree leaves.
  """
  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  bits: int = flax.struct.field(pytree_node=False)
  symmetric: bool = flax.struct.field(pytree_node=False)
  channel_axis: int | None = flax.struct.field(pytree_node=False)
  dtype: str = flax.struct.field(pytree_node=False)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  @property
  def per_channel(self) -> bool:
    return self.channel_axis is not None


def check_bits(bits: Any) -> int:
  """bits must be a Python/numpy integer in 2..8; anything else raises one ValueError."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not (
      MIN_BITS <= bits <= MAX_BITS):
    raise ValueError(f'bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}.')
  return int(bits)


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
  """(q_min, q_max) of the integer codes."""
  if symmetric:
    q_max = 2 ** (bits - 1) - 1
    return -q_max, q_max
  return 0, 2 ** bits - 1


def _channel_axis(ndim: int, per_channel: bool, channel_axis: int) -> int | None:
  if not per_channel or ndim < 2:
    return None
  if not -ndim <= channel_axis < ndim:
    raise ValueError(f'channel_axis={channel_axis} is out of range for a {ndim}-D tensor.')
  return channel_axis % ndim


def _round_up_to_float16(scale: jax.Array) -> jax.Array:
  """The smallest float16-representable value >= scale, as float32.

  Scales are stored in 2 bytes (as GPTQ/AWQ checkpoints do); rounding *up* keeps every code
  within range, so the half-step error bound holds for the stored scale exactly. Scales
  beyond float16's range stay float32 (storage then keeps 4 bytes for them).
  """
  half = scale.astype(jnp.float16)
  half = jnp.where(half.astype(jnp.float32) < scale, jnp.nextafter(half, jnp.float16(jnp.inf)),
                   half).astype(jnp.float32)
  return jnp.where(jnp.isfinite(half), half, scale).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=('bits', 'symmetric', 'axis'))
def _quantize_arrays(x, bits, symmetric, axis):
  x = x.astype(jnp.float32)
  reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
  q_min, q_max = code_range(bits, symmetric)
  if symmetric:
    scale = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True) / q_max
    zero_point = jnp.zeros(scale.shape, jnp.int32)
  else:
    low = jnp.minimum(jnp.min(x, axis=reduce_axes, keepdims=True), 0.0)
    high = jnp.maximum(jnp.max(x, axis=reduce_axes, keepdims=True), 0.0)
    scale = (high - low) / q_max
  # An all-zero channel would divide by zero; any scale represents it exactly.
  scale = _round_up_to_float16(jnp.where(scale > 0, scale, 1.0))
  if not symmetric:
    zero_point = jnp.clip(jnp.round(-low / scale), q_min, q_max).astype(jnp.int32)
  codes = jnp.clip(jnp.round(x / scale) + zero_point, q_min, q_max)
  return codes.astype(jnp.int8 if symmetric else jnp.uint8), scale, zero_point


def quantize(x: jax.typing.ArrayLike, bits: int, *, symmetric: bool = True,
             per_channel: bool = True, channel_axis: int = -1) -> QuantizedTensor:
  """Round-to-nearest quantization of a float tensor to `bits` (2..8) bit codes."""
  bits = check_bits(bits)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'quantize expects a floating-point tensor, got dtype {x.dtype}.')
  axis = _channel_axis(x.ndim, per_channel, channel_axis)
  values, scale, zero_point = _quantize_arrays(x, bits=bits, symmetric=bool(symmetric), axis=axis)
  return QuantizedTensor(values=values, scale=scale, zero_point=zero_point, bits=bits,
                         symmetric=bool(symmetric), channel_axis=axis, dtype=str(x.dtype))


def dequantize(q: QuantizedTensor) -> jax.Array:
  """float32 tensor (values - zero_point) * scale."""
  return (jnp.asarray(q.values).astype(jnp.float32)
          - jnp.asarray(q.zero_point).astype(jnp.float32)) * jnp.asarray(q.scale)


def _is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedTensor)


def _map_selected(fn, params: PyTree, include, exclude) -> PyTree:
  """Apply fn to the leaves whose path is selected; leave the others as they are."""
  named_leaves, treedef = flatten_with_paths(params, is_leaf=_is_quantized)
  selected = set(select_paths([p for p, _ in named_leaves], include, exclude))
  return jax.tree_util.tree_unflatten(
      treedef, [fn(leaf) if path in selected else leaf for path, leaf in named_leaves])


def quantize_tree(params: PyTree, bits: int, *, symmetric: bool = True, per_channel: bool = True,
                  channel_axis: int = -1, include: str | Iterable[str] = DEFAULT_INCLUDE,
                  exclude: str | Iterable[str] = ()) -> PyTree:
  """params with a QuantizedTensor at every selected leaf (default: layer kernels)."""
  bits = check_bits(bits)
  return _map_selected(functools.partial(quantize, bits=bits, symmetric=symmetric,
                                         per_channel=per_channel, channel_axis=channel_axis),
                       params, include, exclude)


def dequantize_tree(tree: PyTree) -> PyTree:
  """Replaces every QuantizedTensor leaf by its float32 dequantization."""
  return jax.tree.map(lambda x: dequantize(x) if _is_quantized(x) else x, tree,
                      is_leaf=_is_quantized)


def fake_quant(x: jax.Array, bits: int, *, symmetric: bool = True, per_channel: bool = True,
               channel_axis: int = -1) -> jax.Array:
  """Quantize-dequantize in x's dtype with a straight-through (identity) gradient.

  Written as x - sg(x) + sg(qdq(x)) rather than x + sg(qdq(x) - x): the gradient is
  the same, but x - x is exactly 0, so the forward value equals qdq(x) bit for bit.
  """
  bits = check_bits(bits)
  x = jnp.asarray(x)
  axis = _channel_axis(x.ndim, per_channel, channel_axis)
  # Codes and scales carry no gradient (straight-through), so trace them on a constant.
  values, scale, zero_point = _quantize_arrays(jax.lax.stop_gradient(x), bits=bits,
                                               symmetric=bool(symmetric), axis=axis)
  rounded = ((values.astype(jnp.float32) - zero_point.astype(jnp.float32)) * scale).astype(x.dtype)
  return x - jax.lax.stop_gradient(x) + jax.lax.stop_gradient(rounded)


def fake_quant_tree(params: PyTree, bits: int, *, symmetric: bool = True,
                    per_channel: bool = True, channel_axis: int = -1,
                    include: str | Iterable[str] = DEFAULT_INCLUDE,
                    exclude: str | Iterable[str] = ()) -> PyTree:
  """fake_quant on the selected leaves (for quantization-aware training); others unchanged."""
  bits = check_bits(bits)
  return _map_selected(functools.partial(fake_quant, bits=bits, symmetric=symmetric,
                                         per_channel=per_channel, channel_axis=channel_axis),
                       params, include, exclude)


def qat_sums(sums_fn: Callable[..., Any], qat: Any) -> Callable[..., Any]:
  """Quantization-aware training: a task's sums computed with fake-quantized weights.

  `qat` is a config section with bits, symmetric, per_channel, include and exclude; the
  gradient passes straight through the rounding, so evaluation of the same function reports
  the quantized model's metrics.
  """
  def sums(params, batch, rng, train):
    quantized = fake_quant_tree(params, qat.bits, symmetric=qat.symmetric,
                                per_channel=qat.per_channel, include=tuple(qat.include),
                                exclude=tuple(qat.exclude))
    return sums_fn(quantized, batch, rng, train)
  return sums

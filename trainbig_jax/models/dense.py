"""The Dense layers' matmul with a kernel gradient laid out for XLA CPU's fast dot kernels.

The kernel gradient of y = x @ W is dW = x^T @ dy, a contraction over the leading (token)
axis of both operands. XLA CPU hands a dot to YNNPACK only when its left operand is
contracted on its last axis; dW is not, so it runs on the slower Eigen path (and the trace
of `benchmarks/profile_step.py` shows it as a launch of a few ms beside the dX product, which
then looks twice as slow as it is). `transposed_input_dot_general` computes the same dW from
an explicit, materialised x^T (kept from being folded back into the dot by an optimization
barrier), which YNNPACK takes: `benchmarks/ops_bench.py --dense` measures both.

Used through `nn.Dense(dot_general=...)`, so the parameter tree and checkpoints are those of
plain nn.Dense.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# EncoderConfig.dense_grad / EncoderDecoderConfig.dense_grad: 'xla' (jax's own VJP),
# 'transposed_input' (the VJP below) or 'auto' (transposed_input on CPU, xla elsewhere).
DENSE_GRAD = ('auto', 'xla', 'transposed_input')


def resolve_dense_grad(dense_grad: str) -> str:
  """The kernel-gradient path `dense_grad` selects on this backend ('auto' resolved)."""
  if dense_grad not in DENSE_GRAD:
    raise ValueError(f'model.dense_grad={dense_grad!r} is invalid; allowed: '
                     f'{", ".join(DENSE_GRAD)}.')
  if dense_grad != 'auto':
    return dense_grad
  return 'transposed_input' if jax.default_backend() == 'cpu' else 'xla'


@jax.custom_vjp
def _matmul_last(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., in] @ kernel [in, out] -> [..., out]."""
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_last_fwd(x, kernel):
  return _matmul_last(x, kernel), (x, kernel)


def _matmul_last_bwd(residuals, dy):
  x, kernel = residuals
  dx = lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
  x_t = lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)  # [in, tokens], materialised
  dkernel = jnp.dot(x_t, dy.reshape(-1, dy.shape[-1]))
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_matmul_last.defvjp(_matmul_last_fwd, _matmul_last_bwd)


def transposed_input_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers,
                                 precision=None, preferred_element_type=None) -> jax.Array:
  """`lax.dot_general` whose kernel gradient is computed from a materialised lhs^T.

  Dense's own contraction (lhs's last axis with a 2-D rhs's first, no batch axes) at default
  precision takes the custom VJP; anything else is plain `lax.dot_general`.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  dense_like = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
                and rhs.ndim == 2 and not lhs_batch and not rhs_batch and precision is None
                and lhs.dtype == rhs.dtype
                and preferred_element_type in (None, lhs.dtype))
  if not dense_like:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  return _matmul_last(lhs, rhs)

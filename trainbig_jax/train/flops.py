"""Training FLOPs counted analytically, and the matmul rate a machine sustains.

A budget in FLOPs (or tokens) is the same on every machine, unlike a wall-clock budget; the
measured matmul rate lets a reader convert one machine's FLOPs into another's seconds. The
throughput benchmark (benchmarks/train_throughput.py) and the train loop both count with
`analytic_flops`.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from trainbig_jax.train.state import path_str


def analytic_flops(params, layers: int, hidden: int, seq_len: int, tokens: int,
                   predicted_tokens: int) -> float:
  """6 FLOPs (forward + backward) per parameter per token it sees, plus attention scores and
  mixing, 12*layers*hidden*seq_len*T (QK^T and AV: forward 4*L*h*s*T, backward twice that).

  The encoder sees every token; the MLM head and the token embedding, tied as the output
  projection, see only the `predicted_tokens` masked positions (the trainer computes logits
  there alone); the input lookups (token and position embeddings) do no multiply-adds.
  `params` may be abstract (only shapes are read).
  """
  def tokens_through(path: str) -> int:
    if path.startswith('mlm_head/') or path == 'embed/token/embedding':
      return predicted_tokens
    if path == 'embed/position/embedding':
      return 0
    return tokens
  per_param = sum(int(np.prod(x.shape)) * tokens_through(path_str(k))
                  for k, x in jax.tree_util.tree_flatten_with_path(params)[0])
  return 6.0 * per_param + 12.0 * layers * hidden * seq_len * tokens


def matmul_flops_per_s(n: int, dtype, reps: int | None = None, seconds: float = 2.0) -> float:
  """Sustained FLOP/s of N x N matmuls on all devices at once (one per device, sharded), so
  it is measured on the same devices the train step uses. Without `reps`, about `seconds`
  of timing."""
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ('d',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P('d'))
  key_a, key_b = jax.random.split(jax.random.key(0))
  make = jax.jit(lambda k: jax.random.normal(k, (len(devices), n, n), dtype),
                 out_shardings=sharding)
  a, b = make(key_a), make(key_b)
  # Chained so that no repetition can be skipped; the scale keeps values bounded.
  matmul = jax.jit(lambda x, y: jnp.einsum('dij,djk->dik', x, y) * (1.0 / math.sqrt(n)),
                   out_shardings=sharding)
  jax.block_until_ready(matmul(a, b))  # compile and warm up
  if reps is None:
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    reps = int(np.clip(seconds / max(time.perf_counter() - t0, 1e-6), 3, 200))
  x = a
  t0 = time.perf_counter()
  for _ in range(reps):
    x = matmul(x, b)
  jax.block_until_ready(x)
  elapsed = time.perf_counter() - t0
  return 2.0 * n ** 3 * len(devices) * reps / elapsed

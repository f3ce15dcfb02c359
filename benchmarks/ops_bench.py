"""Costs the CPU profile showed (benchmarks/profile_step.py), old vs new.

  python benchmarks/ops_bench.py [--rounds=7]
  python benchmarks/ops_bench.py --dense [--hidden=512] [--rounds=9]

GELU forward + backward on a [4096, 2048] fp32 activation (the MLP's width at 6 x 512, batch
32 x 128): jax.nn.gelu(approximate=False) (through erfc) against the encoder's `gelu` (through
erf) and, for scale, the tanh approximation RoBERTa does not use. MLM accuracy over a
[32, 20, 8000] logit block: argmax == target against target logit >= max logit (train/steps.py).
With --dense: the Dense products of the train step at [4096 tokens, hidden] (FFN 4x): the
forward x @ W, the input gradient dy @ W^T and the kernel gradient x^T @ dy as jax's VJP
emits them and in other layouts (a materialised transposed operand behind an optimization
barrier, so that XLA does not fold the transpose back into the dot), and a whole Dense
forward + backward through jax's VJP against a custom VJP whose kernel gradient is
barrier(x.T) @ dy. (The same VJP in every Dense of the encoder, commit 079a59b's
model.dense_grad=transposed_input, made the whole step no faster: benchmarks/RESULTS.md.)
Last, the Q, K, V projections as three matmuls against one on the concatenated kernels.
Variants alternate; medians; the load average is printed with them.
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from trainbig_jax.models.encoder import gelu


def timed_alternating(fns: dict, args: tuple, rounds: int) -> dict[str, float]:
  for f in fns.values():
    jax.block_until_ready(f(*args))
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def _contract(a: jax.Array, b: jax.Array, axis_a: int, axis_b: int) -> jax.Array:
  return jax.lax.dot_general(a, b, (((axis_a,), (axis_b,)), ((), ())))


@jax.custom_vjp
def matmul_transposed_input_grad(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [tokens, in] @ w [in, out], whose kernel gradient is barrier(x.T) @ dy: a dot that
  YNNPACK takes, where jax's own VJP emits x^T @ dy as a contraction over x's first axis,
  which XLA CPU runs on its Eigen path (as an asynchronous `dot`)."""
  return x @ w


def _matmul_fwd(x, w):
  return x @ w, (x, w)


def _matmul_bwd(residuals, dy):
  x, w = residuals
  return _contract(dy, w, 1, 1), jax.lax.optimization_barrier(x.T) @ dy


matmul_transposed_input_grad.defvjp(_matmul_fwd, _matmul_bwd)


def dense_products(tokens: int, hidden: int, rounds: int) -> None:
  """Each Dense product of one layer, in the layout jax's VJP uses and in others."""
  barrier = jax.lax.optimization_barrier
  for d_in, d_out in ((hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)):
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (tokens, d_in))
    w = jax.random.normal(k[1], (d_in, d_out)) * d_in ** -0.5
    dy = jax.random.normal(k[2], (tokens, d_out))
    products = {
        'forward x @ W': (lambda x, w, dy: x @ w),
        'dX: dy @ W^T (jax)': (lambda x, w, dy: _contract(dy, w, 1, 1)),
        'dX: dy @ barrier(W.T)': (lambda x, w, dy: dy @ barrier(w.T)),
        'dW: x^T @ dy (jax)': (lambda x, w, dy: _contract(x, dy, 0, 0)),
        'dW: barrier(x.T) @ dy': (lambda x, w, dy: barrier(x.T) @ dy),
        'dW: (barrier(dy.T) @ x).T': (lambda x, w, dy: (barrier(dy.T) @ x).T),
    }
    fns = {name: jax.jit(f) for name, f in products.items()}
    layers = {'Dense fwd+bwd, jax VJP': jnp.matmul,
              'Dense fwd+bwd, barrier(x.T) VJP': matmul_transposed_input_grad}
    for name, matmul in layers.items():
      def loss(x, w, dy, matmul=matmul):
        return jnp.sum(matmul(x, w) * dy)
      fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1)))
    medians = timed_alternating(fns, (x, w, dy), rounds)
    print(f'[{tokens}, {d_in}] x [{d_in}, {d_out}] fp32, load average '
          f'{os.getloadavg()[0]:.1f}:')
    grads = [fns[name](x, w, dy) for name in layers]
    diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
               for a, b in zip(*grads))
    for name, t in medians.items():
      flop = 2 * tokens * d_in * d_out * (3 if name.startswith('Dense') else 1)
      print(f'  {name:34s} {t * 1e3:8.1f} ms  {flop / t / 1e9:6.1f} GFLOP/s')
    print(f'  (the two VJPs\' gradients differ by at most {diff:.1e} of their largest value)')
  # Q, K and V projections: three [hidden, hidden] matmuls, or one against the three kernels
  # concatenated at call time (the parameter tree unchanged), forward + backward.
  k = jax.random.split(jax.random.key(1), 7)
  x = jax.random.normal(k[0], (tokens, hidden))
  kernels = [jax.random.normal(k[i], (hidden, hidden)) * hidden ** -0.5 for i in (1, 2, 3)]
  dys = [jax.random.normal(k[i], (tokens, hidden)) for i in (4, 5, 6)]

  def separate(x, kernels, dys):
    return sum(jnp.sum((x @ w) * dy) for w, dy in zip(kernels, dys))

  def fused(x, kernels, dys):
    outputs = jnp.split(x @ jnp.concatenate(kernels, axis=1), 3, axis=-1)
    return sum(jnp.sum(y * dy) for y, dy in zip(outputs, dys))
  fns = {'Q, K, V: three matmuls': jax.jit(jax.grad(separate, argnums=(0, 1))),
         'Q, K, V: one, kernels concatenated': jax.jit(jax.grad(fused, argnums=(0, 1)))}
  medians = timed_alternating(fns, (x, kernels, dys), rounds)
  print(f'Q, K, V projections fwd+bwd, [{tokens}, {hidden}] x 3 x [{hidden}, {hidden}] fp32, '
        f'load average {os.getloadavg()[0]:.1f}:')
  for name, t in medians.items():
    print(f'  {name:34s} {t * 1e3:8.1f} ms  {9 * 2 * tokens * hidden ** 2 / t / 1e9:6.1f} '
          f'GFLOP/s')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--dense', action='store_true', help='the Dense products instead')
  parser.add_argument('--hidden', type=int, default=512, help='with --dense')
  parser.add_argument('--tokens', type=int, default=4096, help='with --dense')
  args = parser.parse_args()
  if args.dense:
    dense_products(args.tokens, args.hidden, args.rounds)
    return
  x = jax.random.normal(jax.random.key(0), (4096, 2048))
  variants = {'jax.nn.gelu (erfc)': lambda y: jax.nn.gelu(y, approximate=False),
              'encoder gelu (erf)': gelu,
              'tanh approximation': lambda y: jax.nn.gelu(y, approximate=True)}
  reference = np.asarray(variants['jax.nn.gelu (erfc)'](x))
  grads = {k: jax.jit(jax.value_and_grad(lambda y, f=f: jnp.sum(f(y) * y)))
           for k, f in variants.items()}
  medians = timed_alternating(grads, (x,), args.rounds)
  first = medians['jax.nn.gelu (erfc)']
  print(f'GELU fwd+bwd [4096, 2048] fp32, load average {os.getloadavg()[0]:.1f}:')
  for k, f in variants.items():
    diff = float(np.abs(np.asarray(jax.jit(f)(x)) - reference).max())
    print(f'  {k:20s} {medians[k] * 1e3:8.1f} ms  {first / medians[k]:5.2f}x  '
          f'max |diff| {diff:.1e}')
  logits = jax.random.normal(jax.random.key(1), (32, 20, 8000))
  targets = jax.random.randint(jax.random.key(2), (32, 20), 0, 8000)
  accuracy = {
      'argmax == target': jax.jit(lambda l, t: jnp.sum(jnp.argmax(l, -1) == t)),
      'target >= max': jax.jit(lambda l, t: jnp.sum(
          jnp.take_along_axis(l, t[..., None], -1)[..., 0] >= jnp.max(l, -1))),
  }
  medians = timed_alternating(accuracy, (logits, targets), args.rounds)
  first = medians['argmax == target']
  print(f'MLM accuracy over [32, 20, 8000] logits, load average {os.getloadavg()[0]:.1f}:')
  for k in accuracy:
    print(f'  {k:20s} {medians[k] * 1e3:8.2f} ms  {first / medians[k]:5.2f}x')


if __name__ == '__main__':
  main()

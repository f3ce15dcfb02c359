"""Two elementwise costs the CPU profile showed (benchmarks/profile_step.py), old vs new.

  python benchmarks/ops_bench.py [--rounds=7]

GELU forward + backward on a [4096, 2048] fp32 activation (the MLP's width at 6 x 512, batch
32 x 128): jax.nn.gelu(approximate=False) (through erfc) against the encoder's `gelu` (through
erf) and, for scale, the tanh approximation RoBERTa does not use. MLM accuracy over a
[32, 20, 8000] logit block: argmax == target against target logit >= max logit (train/steps.py).
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rounds', type=int, default=7)
  args = parser.parse_args()
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

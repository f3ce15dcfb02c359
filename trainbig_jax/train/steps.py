"""Jitted train and eval steps, shared by every task.

A task gives a `sums_fn(params, batch, rng, train) -> {'loss', 'weight', 'correct', 'tokens'}`
of *sums* over a batch (trainbig_jax/tasks). The train step splits the batch into
micro-batches, adds their sums and gradients, and normalises once by the total weight, so
gradient accumulation gives exactly the gradient of the full batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from trainbig_jax.train.state import TrainState

PyTree = Any
Batch = dict[str, jax.Array]
SumsFn = Callable[[PyTree, Batch, jax.Array, bool], dict[str, jax.Array]]


def make_train_step(sums_fn: SumsFn, tx: optax.GradientTransformation, accum_steps: int):
  """(state, batch, rng) -> (state, metrics); metrics are batch means and counts."""

  def micro_grads(params, micro, rng):
    def loss_of(p):
      s = sums_fn(p, micro, rng, True)
      return s['loss'], s
    return jax.grad(loss_of, has_aux=True)(params)

  def step(state: TrainState, batch: Batch, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    if accum_steps == 1:
      grads, sums = micro_grads(state.params, batch, rng)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)
      def body(carry, inputs):
        i, mb = inputs
        g, s = micro_grads(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, s)), None
      zero = jax.eval_shape(micro_grads, state.params,
                            jax.tree.map(lambda x: x[0], micro), rng)
      zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zero)
      (grads, sums), _ = jax.lax.scan(body, zero, (jnp.arange(accum_steps), micro))
    denom = jnp.maximum(sums['weight'], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'train_loss': sums['loss'] / denom, 'train_accuracy': sums['correct'] / denom,
               'tokens': sums['tokens'], 'grad_norm': optax.tree.norm(grads)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_eval_step(sums_fn: SumsFn):
  """(params, batch) -> sums, deterministic (no dropout)."""
  def step(params, batch):
    return sums_fn(params, batch, jax.random.key(0), False)
  return step

"""Jitted train and eval steps, shared by pretraining and fine-tuning.

A task is a `sums_fn(params, batch, rng, train) -> {'loss', 'weight', 'correct', ...}` of
*sums* over a batch. The train step splits the batch into micro-batches, adds their sums and
gradients, and normalises once by the total weight, so gradient accumulation gives exactly
the gradient of the full batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trainbig_jax.train.state import TrainState

PyTree = Any
Batch = dict[str, jax.Array]
SumsFn = Callable[[PyTree, Batch, jax.Array, bool], dict[str, jax.Array]]


def mlm_sums(model: nn.Module, max_predictions: int | None = None) -> SumsFn:
  """Masked-LM cross-entropy and accuracy summed over the masked positions.

  With `max_predictions`, logits are computed only at (up to) that many masked positions per
  sequence, picked by top_k on the weights; the data pipeline masks an exact count per
  sequence, so a bound of ceil(mask_rate * length) loses nothing.
  """
  def sums(params, batch, rng, train):
    inputs, targets, weights = batch['inputs'], batch['targets'], batch['weights']
    positions = None
    if max_predictions is not None and max_predictions < inputs.shape[1]:
      positions = jax.lax.top_k(weights, max_predictions)[1]
      targets = jnp.take_along_axis(targets, positions, axis=1)
      weights = jnp.take_along_axis(weights, positions, axis=1)
    logits = model.apply({'params': params}, inputs, train=train, task='mlm',
                         positions=positions, rngs={'dropout': rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    # The target has the largest logit: one max over the vocabulary, which the loss's
    # logsumexp also takes, instead of an argmax (a slow variadic reduce on XLA CPU).
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = target_logits >= jnp.max(logits, axis=-1)
    return {'loss': jnp.sum(loss * weights), 'weight': jnp.sum(weights),
            'correct': jnp.sum(correct * weights),
            'tokens': jnp.sum(inputs != model.cfg.pad_id).astype(jnp.float32)}
  return sums


def classification_sums(model: nn.Module) -> SumsFn:
  """Cross-entropy and accuracy summed over the real (weight 1) examples."""
  def sums(params, batch, rng, train):
    logits = model.apply({'params': params}, batch['inputs'], train=train, task='classify',
                         rngs={'dropout': rng})
    weights = batch['weights']
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels'])
    correct = jnp.argmax(logits, -1) == batch['labels']
    return {'loss': jnp.sum(loss * weights), 'weight': jnp.sum(weights),
            'correct': jnp.sum(correct * weights),
            'tokens': jnp.sum(batch['inputs'] != model.cfg.pad_id).astype(jnp.float32)}
  return sums


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

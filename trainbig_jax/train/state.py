"""Optimizer, train state and its sharded initialisation.

The state is created directly in its sharded layout: `jax.eval_shape` gives the abstract
state with logical axis names, the names become NamedShardings, and the init function is
jitted with those as out_shardings, so no device ever holds a full unsharded copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trainbig_jax.models.layout import path_str
from trainbig_jax.train import partitioning
from trainbig_jax.train.checkpoint import CheckpointError

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree
  opt_state: PyTree


def weight_decay_mask(params: PyTree) -> PyTree:
  """True for kernels and embeddings; biases and LayerNorm parameters get no decay."""
  def decays(path, _):
    p = path_str(path)
    return not (p.endswith('bias') or 'norm/' in p)
  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup to the peak rate, then linear decay to zero at total_steps."""
  lr, warmup = train_config.learning_rate, train_config.warmup_steps
  decay_steps = max(1, train_config.total_steps - warmup)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(1, warmup)), optax.linear_schedule(lr, 0.0, decay_steps)],
      [warmup])


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW (decay masked off biases and LayerNorm) after global-norm gradient clipping."""
  adamw = optax.adamw(learning_rate_schedule(train_config), b1=train_config.b1,
                      b2=train_config.b2, eps=train_config.eps,
                      weight_decay=train_config.weight_decay, mask=weight_decay_mask)
  if train_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip), adamw)
  return adamw


def create_sharded_state(
    init_params: Callable[[jax.Array], PyTree],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
) -> tuple[TrainState, PyTree]:
  """Initialises the train state sharded over `mesh`; returns it and its shardings.

  `init_params(rng)` returns a parameter tree boxed with logical axis names (what
  `model.init(...)['params']` gives). The optimizer sees plain arrays; each optimizer-state
  leaf whose path ends with a parameter's path and has its shape (Adam moments, pruning
  masks, ...) is sharded like that parameter, anything else (counters) is replicated.
  """
  fresh_state = _fresh_state_fn(init_params, tx)
  shardings = abstract_sharded_state(init_params, tx, mesh)[1]
  init = jax.jit(fresh_state, out_shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
    state = init(rng)
  return state, shardings


def _fresh_state_fn(init_params, tx):
  def fresh_state(rng):
    params = nn.meta.unbox(init_params(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return fresh_state


def abstract_sharded_state(
    init_params: Callable[[jax.Array], PyTree],
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[TrainState, PyTree]:
  """(state of ShapeDtypeStructs carrying their shardings, the shardings), allocating nothing.

  What `create_sharded_state` would create; memory planning compiles against it.
  """
  param_shardings = params_shardings(init_params, mesh)
  abstract = jax.eval_shape(_fresh_state_fn(init_params, tx), jax.random.key(0))
  shardings = TrainState(
      step=NamedSharding(mesh, P()), params=param_shardings,
      opt_state=_follow_param_shardings(abstract.opt_state, abstract.params, param_shardings,
                                        NamedSharding(mesh, P())))
  return abstract_state(shardings, abstract), shardings


def params_shardings(init_params: Callable[[jax.Array], PyTree], mesh: Mesh) -> PyTree:
  """NamedShardings of the parameter tree, from its logical axis names (no allocation)."""
  abstract = jax.eval_shape(init_params, jax.random.key(0))
  return partitioning.logical_shardings(nn.get_partition_spec(abstract), mesh)


def check_params_fit(params: PyTree, init_params: Callable[[jax.Array], PyTree], source: str,
                     model_from: str) -> None:
  """Refuses a parameter tree whose names or shapes are not those of the model it is loaded
  into (no allocation), naming the first parameter that differs.

  Without it, a run folder whose tokenizer.model or config.json was replaced fails deep
  inside the model's first apply, in a Flax traceback. `source` names the checkpoint,
  `model_from` what the model was built from.
  """
  abstract = nn.unbox(jax.eval_shape(init_params, jax.random.key(0)))
  want = {path_str(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  got = {path_str(k): tuple(np.shape(v))
         for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name in sorted(want.keys() | got.keys()):
    if want.get(name) == got.get(name):
      continue
    held = (f'holds {name} of shape {got[name]}' if name in got
            else f'has no parameter {name}')
    needed = f'needs {want[name]}' if name in want else 'has no such parameter'
    raise CheckpointError(f'{source} {held}, but the model made from {model_from} {needed}: '
                          'put back the files the run was trained with.')


def _follow_param_shardings(opt_state, params, param_shardings, replicated):
  by_path = {path_str(k): (v.shape, s) for (k, v), s in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings))}

  def sharding_of(key_path, leaf):
    parts = path_str(key_path).split('/')
    for i in range(len(parts)):
      match = by_path.get('/'.join(parts[i:]))
      if match is not None and match[0] == leaf.shape:
        return match[1]
    return replicated
  return jax.tree_util.tree_map_with_path(sharding_of, opt_state)


def abstract_state(state_shardings: PyTree, state_shapes: PyTree) -> PyTree:
  """ShapeDtypeStructs carrying shardings: the restore target for a checkpoint."""
  return jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state_shardings, state_shapes)

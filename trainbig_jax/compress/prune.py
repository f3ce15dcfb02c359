"""Magnitude and structured pruning as pure functions on parameter trees.

Mask representation (used by every function here and by `storage`): a tree with
exactly the structure of `params` whose leaves are bool arrays of the parameter's
shape (True = keep, False = pruned) at the selected leaves and `None` everywhere
else. `None` is an empty pytree node in JAX, so a mask tree can live inside an
optax state and go through `jax.jit`; map over it with
`jax.tree.map(f, masks, params, is_leaf=lambda x: x is None)`.

Parameters are selected by regexes searched in '/'-joined key paths such as
'layers_3/mlp/wi/kernel', so the same calls work for any model in the project.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trainbig_jax.models.layout import LAYER_KERNELS, flatten_with_paths, path_str

PyTree = Any

SCOPES = ('layer', 'global')

# Bit pattern of +inf: the largest key a (NaN-free) magnitude can have.
_INF_BITS = 0x7F800000
# Bisection over [-1, _INF_BITS] halves an interval of < 2**31 keys: 31 rounds.
_BISECTION_ROUNDS = 31


# --------------------------------------------------------------------------- paths

def _as_patterns(patterns: str | Iterable[str]) -> tuple[str, ...]:
  # A bare string is one pattern, not an iterable of one-character patterns.
  return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def select_paths(paths: Sequence[str], include: str | Iterable[str],
                 exclude: str | Iterable[str] = ()) -> list[str]:
  """Paths matched (re.search) by some include pattern and by no exclude pattern.

  Raises ValueError naming any pattern that matches none of `paths`: a typo in a
  pattern would otherwise silently prune (or spare) nothing.
  """
  include, exclude = _as_patterns(include), _as_patterns(exclude)
  for pattern in include + exclude:
    try:
      regex = re.compile(pattern)
    except re.error as err:
      raise ValueError(f'Pattern {pattern!r} is not a valid regular expression: {err}.') from None
    if not any(regex.search(p) for p in paths):
      raise ValueError(f'Pattern {pattern!r} matches no parameter path '
                       f'(paths look like {paths[0]!r}).' if paths else
                       f'Pattern {pattern!r} matches no parameter: the tree is empty.')
  return [p for p in paths
          if any(re.search(i, p) for i in include) and not any(re.search(e, p) for e in exclude)]


def prunable_paths(params: PyTree, include: str | Iterable[str] = LAYER_KERNELS,
                   exclude: str | Iterable[str] = ()) -> list[str]:
  """Paths of the parameters selected for pruning, in tree order."""
  named_leaves, _ = flatten_with_paths(params)
  return select_paths([p for p, _ in named_leaves], include, exclude)


def _masks_tree(params: PyTree, masks_by_path: dict[str, Any]) -> PyTree:
  """Mask tree with params' structure: the given masks at their paths, None elsewhere."""
  named_leaves, treedef = flatten_with_paths(params)
  return jax.tree_util.tree_unflatten(treedef, [masks_by_path.get(p) for p, _ in named_leaves])


def masks_by_path(masks: PyTree) -> dict[str, Any]:
  """{path: bool mask} for the non-None leaves of a mask tree."""
  named, _ = flatten_with_paths(masks, is_leaf=lambda x: x is None)
  return {p: m for p, m in named if m is not None}


# ------------------------------------------------------------------- validation


def _check_fraction(value: Any, name: str) -> float:
  """A sparsity/fraction must be a real number in [0, 1): 1.0 would delete whole matrices."""
  try:
    as_float = float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{name} must be a number in [0, 1), got {value!r}.') from None
  if not 0.0 <= as_float < 1.0:
    raise ValueError(f'{name} must be in [0, 1), got {value!r}.')
  return as_float


def _check_scope(scope: str) -> None:
  if scope not in SCOPES:
    raise ValueError(f'scope must be one of {SCOPES}, got {scope!r}.')


# --------------------------------------------------------- exact magnitude masks


def _magnitude_keys(x: jax.Array) -> jax.Array:
  """int32 keys that sort like |x| (float32 bit patterns of non-negative floats are monotone).

  NaN counts as +inf so it is always kept last-to-prune and the key range stays bounded.
  """
  magnitude = jnp.abs(x.astype(jnp.float32)).ravel()
  magnitude = jnp.where(jnp.isnan(magnitude), jnp.inf, magnitude)
  return jax.lax.bitcast_convert_type(magnitude, jnp.int32)


def _keep_masks(arrays: Sequence[jax.Array], num_pruned: jax.Array) -> list[jax.Array]:
  """Keep-masks pruning exactly `num_pruned` smallest |x| jointly across `arrays`.

  Order is (|x|, array position in `arrays`, flat index), so ties are broken
  deterministically and the result equals a stable argsort of the concatenation.
  Works with a traced `num_pruned` (used inside jit by the gradual pruner). Instead
  of sorting, it bisects the int32 bit pattern of |x| for the threshold: 31 counting
  passes, no sort, no concatenated copy, linear time.
  """
  keys = [_magnitude_keys(a) for a in arrays]
  num_pruned = jnp.asarray(num_pruned, jnp.int32)

  def count_at_most(threshold):
    return sum(jnp.sum(k <= threshold, dtype=jnp.int32) for k in keys)

  def bisect(_, bounds):
    # Invariant: count_at_most(low) < num_pruned <= count_at_most(high).
    low, high = bounds
    mid = low + (high - low) // 2
    enough = count_at_most(mid) >= num_pruned
    return jnp.where(enough, low, mid), jnp.where(enough, mid, high)

  _, threshold = jax.lax.fori_loop(
      0, _BISECTION_ROUNDS, bisect, (jnp.int32(-1), jnp.int32(_INF_BITS)))
  # Everything strictly below the threshold goes; of the entries equal to it, the
  # first ones in (array, flat index) order go until exactly num_pruned are gone.
  ties_to_prune = num_pruned - sum(jnp.sum(k < threshold, dtype=jnp.int32) for k in keys)
  masks, ties_before = [], jnp.int32(0)
  for array, key in zip(arrays, keys):
    is_tie = key == threshold
    tie_rank = ties_before + jnp.cumsum(is_tie, dtype=jnp.int32)
    pruned = (key < threshold) | (is_tie & (tie_rank <= ties_to_prune))
    masks.append(~pruned.reshape(array.shape))
    ties_before = tie_rank[-1] if key.size else ties_before
  return masks


def _keep_masks_host(arrays: Sequence[Any], num_pruned: int) -> list[np.ndarray]:
  """numpy twin of `_keep_masks` (same order, same result) for host-side compression.

  np.partition selects the threshold in linear time and is several times faster
  than the jitted bisection on CPU for a one-off pass over ~10^8 weights.
  """
  magnitudes = []
  for a in arrays:
    magnitude = np.abs(np.asarray(a, np.float32)).ravel()
    magnitudes.append(np.where(np.isnan(magnitude), np.float32(np.inf), magnitude))
  if num_pruned == 0:
    return [np.ones(np.shape(a), bool) for a in arrays]
  joined = magnitudes[0] if len(magnitudes) == 1 else np.concatenate(magnitudes)
  threshold = np.partition(joined, num_pruned - 1)[num_pruned - 1]
  del joined
  ties_to_prune = num_pruned - sum(int(np.count_nonzero(m < threshold)) for m in magnitudes)
  masks = []
  for a, magnitude in zip(arrays, magnitudes):
    pruned = magnitude < threshold
    tie_positions = np.flatnonzero(magnitude == threshold)
    take = min(max(ties_to_prune, 0), tie_positions.size)
    pruned[tie_positions[:take]] = True
    ties_to_prune -= take
    masks.append(~pruned.reshape(np.shape(a)))
  return masks


def _masks_for_sparsity(arrays: Sequence[jax.Array], sparsity: jax.Array, scope: str
                        ) -> list[jax.Array]:
  """Traceable mask computation for a (possibly traced) sparsity; k = round(s * n) in float32."""
  sparsity = jnp.asarray(sparsity, jnp.float32)
  if scope == 'layer':
    return [_keep_masks([a], jnp.round(sparsity * a.size).astype(jnp.int32))[0] for a in arrays]
  total = sum(a.size for a in arrays)
  return _keep_masks(arrays, jnp.round(sparsity * total).astype(jnp.int32))


def magnitude_masks(params: PyTree, sparsity: float, *, scope: str = 'layer',
                    include: str | Iterable[str] = LAYER_KERNELS,
                    exclude: str | Iterable[str] = ()) -> PyTree:
  """Keep-masks that prune the smallest-magnitude weights to an exact sparsity.

  scope='layer': every selected matrix loses exactly round(sparsity * size) entries.
  scope='global': exactly round(sparsity * total_selected) entries are pruned with one
  magnitude threshold shared by all selected matrices (so layers with small weights
  lose more). Ties: smaller (tree position, flat index) is pruned first. Runs on the
  host with numpy (np.partition, linear time); the gradual pruner uses an equivalent
  jit-able selection. Returns a mask tree (see module docstring).
  """
  sparsity = _check_fraction(sparsity, 'sparsity')
  _check_scope(scope)
  named_leaves, _ = flatten_with_paths(params)
  leaves = dict(named_leaves)
  selected = select_paths(list(leaves), include, exclude)
  arrays = [np.asarray(leaves[p]) for p in selected]
  if scope == 'layer':
    masks = [_keep_masks_host([a], round(sparsity * a.size))[0] for a in arrays]
  else:
    masks = _keep_masks_host(arrays, round(sparsity * sum(a.size for a in arrays)))
  return _masks_tree(params, {p: jnp.asarray(m) for p, m in zip(selected, masks)})


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """params with zeros where the mask is False; leaves with a None mask are untouched."""
  def apply(mask, param):
    if mask is None:
      return param
    if tuple(mask.shape) != tuple(np.shape(param)):
      raise ValueError(f'Mask shape {tuple(mask.shape)} does not match parameter shape '
                       f'{tuple(np.shape(param))}.')
    return jnp.where(mask, param, jnp.zeros((), jnp.asarray(param).dtype))
  return jax.tree.map(apply, masks, params, is_leaf=lambda x: x is None)


def sparsity_report(params: PyTree, masks: PyTree | None = None) -> dict[str, Any]:
  """Counts of all and nonzero parameters, after masks if given.

  Returns dict(total_params, nonzero_params, sparsity (fraction of zeros overall),
  per_path {path: fraction of zeros}). per_path covers the masked leaves when masks
  are given, every leaf otherwise.
  """
  effective = params if masks is None else apply_masks(params, masks)
  named_leaves, _ = flatten_with_paths(effective)
  reported = set(masks_by_path(masks)) if masks is not None else {p for p, _ in named_leaves}
  total = nonzero = 0
  per_path = {}
  for path, leaf in named_leaves:
    size = int(np.size(leaf))
    leaf_nonzero = int(jnp.count_nonzero(leaf))
    total += size
    nonzero += leaf_nonzero
    if path in reported:
      per_path[path] = 1.0 - leaf_nonzero / size if size else 0.0
  return dict(total_params=total, nonzero_params=nonzero,
              sparsity=1.0 - nonzero / total if total else 0.0, per_path=per_path)


# ------------------------------------------------------------ gradual pruning


def cubic_sparsity(step: jax.typing.ArrayLike, *, final_sparsity: float, begin_step: int,
                   end_step: int, initial_sparsity: float = 0.0, frequency: int = 1
                   ) -> jax.Array:
  """Zhu & Gupta (2017) schedule: s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))**3.

  t0 = begin_step, n*dt = end_step - begin_step. Sparsity only changes every
  `frequency` steps after begin_step (t is rounded down to the last such step),
  is initial_sparsity before begin_step and final_sparsity from end_step on.
  Returns a float32 scalar; `step` may be traced.
  """
  if frequency < 1:
    raise ValueError(f'frequency must be an integer >= 1, got {frequency!r}.')
  if end_step < begin_step:
    raise ValueError(f'end_step must be >= begin_step, got begin_step={begin_step}, '
                     f'end_step={end_step}.')
  step = jnp.asarray(step, jnp.int32)
  last_update = begin_step + (jnp.maximum(step - begin_step, 0) // frequency) * frequency
  last_update = jnp.where(step >= end_step, end_step, last_update)
  span = max(end_step - begin_step, 1)
  progress = jnp.clip((last_update - begin_step) / span, 0.0, 1.0).astype(jnp.float32)
  sparsity = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3
  return jnp.where(step >= end_step, jnp.float32(final_sparsity), sparsity.astype(jnp.float32))


class PruningState(NamedTuple):
  """optax state of `gradual_magnitude_pruning`: step counter and the current mask tree."""
  count: jax.Array
  masks: PyTree


def gradual_magnitude_pruning(final_sparsity: float, begin_step: int, end_step: int, *,
                              update_every: int = 1, scope: str = 'layer',
                              include: str | Iterable[str] = LAYER_KERNELS,
                              exclude: str | Iterable[str] = (),
                              initial_sparsity: float = 0.0) -> optax.GradientTransformation:
  """optax transformation for Zhu & Gupta gradual magnitude pruning; chain it LAST.

  Use `optax.chain(optax.adamw(...), gradual_magnitude_pruning(...))` or
  `with_pruning(inner, ...)`. update() needs `params`. On update calls whose step
  (0-based count of calls) is begin_step + k*update_every or end_step, and within
  [begin_step, end_step], masks are recomputed from the magnitudes the parameters
  would have after this update (previously pruned entries count as zero, so pruned
  weights never regrow), at the sparsity `cubic_sparsity` gives for that step. After
  end_step masks stay fixed. At pruned positions the returned update is -params, so
  `optax.apply_updates` yields exactly 0.0 there (p + (-p) == 0 in IEEE floats).
  jit-compatible: the schedule step is traced and branches via lax.cond.
  """
  final_sparsity = _check_fraction(final_sparsity, 'final_sparsity')
  initial_sparsity = _check_fraction(initial_sparsity, 'initial_sparsity')
  _check_scope(scope)
  if initial_sparsity > final_sparsity:
    raise ValueError(f'initial_sparsity ({initial_sparsity}) must not exceed final_sparsity '
                     f'({final_sparsity}).')
  if not (isinstance(begin_step, int) and isinstance(end_step, int)
          and 0 <= begin_step <= end_step):
    raise ValueError(f'Need integers 0 <= begin_step <= end_step, got begin_step={begin_step!r},'
                     f' end_step={end_step!r}.')
  if not (isinstance(update_every, int) and update_every >= 1):
    raise ValueError(f'update_every must be an integer >= 1, got {update_every!r}.')

  def schedule(step):
    return cubic_sparsity(step, final_sparsity=final_sparsity, begin_step=begin_step,
                          end_step=end_step, initial_sparsity=initial_sparsity,
                          frequency=update_every)

  def init_fn(params):
    paths = prunable_paths(params, include, exclude)
    leaves = dict(flatten_with_paths(params)[0])
    masks = _masks_tree(params, {p: jnp.ones(np.shape(leaves[p]), jnp.bool_) for p in paths})
    return PruningState(count=jnp.zeros([], jnp.int32), masks=masks)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('gradual_magnitude_pruning needs the current params: call '
                       'update(updates, state, params).')
    step = state.count
    on_schedule = (((step - begin_step) % update_every == 0) | (step == end_step))
    recompute_now = (step >= begin_step) & (step <= end_step) & on_schedule
    old_masks = masks_by_path(state.masks)
    named_params = dict(flatten_with_paths(params)[0])
    named_updates = dict(flatten_with_paths(updates)[0])
    paths = list(old_masks)

    def recompute(_):
      # Magnitudes after this step, with already-pruned entries held at zero.
      after = [jnp.where(old_masks[p], named_params[p] + named_updates[p], 0) for p in paths]
      return _masks_for_sparsity(after, schedule(step), scope)

    new_masks = jax.lax.cond(recompute_now, recompute, lambda _: [old_masks[p] for p in paths],
                             None)
    new_masks = dict(zip(paths, new_masks))

    def mask_update(path, update):
      if path not in new_masks:
        return update
      return jnp.where(new_masks[path], update, -named_params[path]).astype(update.dtype)

    named_updates_list, treedef = flatten_with_paths(updates)
    masked_updates = jax.tree_util.tree_unflatten(
        treedef, [mask_update(p, u) for p, u in named_updates_list])
    return masked_updates, PruningState(count=optax.safe_increment(step),
                                        masks=_masks_tree(params, new_masks))

  return optax.GradientTransformation(init_fn, update_fn)


def with_pruning(inner: optax.GradientTransformation, final_sparsity: float, begin_step: int,
                 end_step: int, **pruning_kwargs: Any) -> optax.GradientTransformation:
  """`inner` followed by `gradual_magnitude_pruning(final_sparsity, begin_step, end_step, ...)`."""
  return optax.chain(inner, gradual_magnitude_pruning(final_sparsity, begin_step, end_step,
                                                      **pruning_kwargs))


def final_masks(opt_state: PyTree) -> PyTree:
  """The mask tree held by the (single) PruningState inside an optax state."""
  states = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, PruningState)) if isinstance(s, PruningState)]
  if len(states) != 1:
    raise ValueError(f'Expected exactly one PruningState in the optimizer state, found '
                     f'{len(states)}.')
  return states[0].masks


# ----------------------------------------------------------- structured pruning


def _blocks_with(named: dict[str, Any], children: Sequence[str], include, exclude
                 ) -> list[str]:
  """Module paths P having P/<child>/kernel for every child, filtered by include/exclude."""
  first = f'/{children[0]}/kernel'
  prefixes = [p[:-len(first)] for p in named if p.endswith(first)]
  prefixes = [p for p in prefixes if all(f'{p}/{c}/kernel' in named for c in children)]
  if not prefixes:
    raise ValueError(f'No module with {"/".join(children)} kernels found in the parameter tree.')
  return select_paths(prefixes, include, exclude)


def _lowest_scores(scores: np.ndarray, num_pruned: int) -> np.ndarray:
  """Bool array, True for the `num_pruned` lowest scores (ties: lower index first)."""
  pruned = np.zeros(scores.shape, bool)
  pruned[np.argsort(scores, kind='stable')[:num_pruned]] = True
  return pruned


def _check_keeps_one(fraction: float, units: int, what: str, block: str) -> None:
  """Structured pruning must leave a block at least one unit: none left would cut it out."""
  if round(fraction * units) >= units:
    below = (units - 0.5) / units
    raise ValueError(f'Pruning {fraction:g} of the {units} {what} of {block} would remove '
                     f'all of them; use a sparsity below {below:g} (at most {units - 1} of '
                     f'{units} removed).')


def head_masks(params: PyTree, num_heads: int, fraction: float, *,
               include: str | Iterable[str] = (r'.',), exclude: str | Iterable[str] = (),
               names: tuple[str, str, str, str] = ('query', 'key', 'value', 'out')) -> PyTree:
  """Element masks removing round(fraction * num_heads) whole heads per attention block.

  An attention block is any module with query/key/value/out kernels (`names`); include/
  exclude filter blocks by their module path. A head's score is the L2 norm of its
  query/key/value kernel columns plus its out kernel rows; the lowest-scoring heads
  lose those columns/rows and their query/key/value bias entries. Kernels may be
  [D, H*dh] / [H*dh, D] or [D, H, dh] / [H, dh, D].
  """
  fraction = _check_fraction(fraction, 'fraction')
  if not (isinstance(num_heads, int) and num_heads >= 1):
    raise ValueError(f'num_heads must be a positive integer, got {num_heads!r}.')
  named = dict(flatten_with_paths(params)[0])
  *qkv, out = names
  masks = {}
  for block in _blocks_with(named, names, include, exclude):
    heads_in = {n: np.asarray(named[f'{block}/{n}/kernel']) for n in qkv}
    out_kernel = np.asarray(named[f'{block}/{out}/kernel'])
    for name, kernel in [*heads_in.items(), (out, out_kernel)]:
      if kernel.size % (num_heads * (kernel.shape[-1] if name == out else kernel.shape[0])):
        raise ValueError(f'{block}/{name}/kernel with shape {kernel.shape} cannot be split '
                         f'into num_heads={num_heads} heads.')
    # Per head: squared norms of [D, H, dh] columns and [H, dh, D] rows.
    squared = sum(np.square(k.reshape(k.shape[0], num_heads, -1), dtype=np.float64).sum((0, 2))
                  for k in heads_in.values())
    squared += np.square(out_kernel.reshape(num_heads, -1, out_kernel.shape[-1]),
                         dtype=np.float64).sum((1, 2))
    _check_keeps_one(fraction, num_heads, 'heads', f'{block} (attention)')
    keep_head = ~_lowest_scores(np.sqrt(squared), round(fraction * num_heads))
    for name, kernel in heads_in.items():
      per_head = kernel.reshape(kernel.shape[0], num_heads, -1)
      masks[f'{block}/{name}/kernel'] = jnp.asarray(np.broadcast_to(
          keep_head[None, :, None], per_head.shape).reshape(kernel.shape))
      bias_path = f'{block}/{name}/bias'
      if bias_path in named:
        bias_shape = np.shape(named[bias_path])
        masks[bias_path] = jnp.asarray(np.broadcast_to(
            keep_head[:, None], (num_heads, int(np.prod(bias_shape)) // num_heads)
        ).reshape(bias_shape))
    per_head = out_kernel.reshape(num_heads, -1, out_kernel.shape[-1])
    masks[f'{block}/{out}/kernel'] = jnp.asarray(np.broadcast_to(
        keep_head[:, None, None], per_head.shape).reshape(out_kernel.shape))
  return _masks_tree(params, masks)


def neuron_masks(params: PyTree, fraction: float, *,
                 include: str | Iterable[str] = (r'.',), exclude: str | Iterable[str] = (),
                 names: tuple[str, str] = ('wi', 'wo')) -> PyTree:
  """Element masks removing round(fraction * F) hidden neurons per MLP block.

  An MLP block is any module with wi [D, F] and wo [F, D] kernels (`names`). A
  neuron's score is the L2 norm of its wi column plus its wo row; the lowest-scoring
  neurons lose their wi column, wi bias entry and wo row (wo's bias stays).
  """
  fraction = _check_fraction(fraction, 'fraction')
  named = dict(flatten_with_paths(params)[0])
  wi_name, wo_name = names
  masks = {}
  for block in _blocks_with(named, names, include, exclude):
    wi = np.asarray(named[f'{block}/{wi_name}/kernel'])
    wo = np.asarray(named[f'{block}/{wo_name}/kernel'])
    if wi.ndim != 2 or wo.ndim != 2 or wi.shape[1] != wo.shape[0]:
      raise ValueError(f'{block}: expected wi [D, F] and wo [F, D] kernels, got {wi.shape} and '
                       f'{wo.shape}.')
    squared = np.square(wi, dtype=np.float64).sum(0) + np.square(wo, dtype=np.float64).sum(1)
    _check_keeps_one(fraction, wi.shape[1], 'neurons', f'{block} (MLP)')
    keep = ~_lowest_scores(np.sqrt(squared), round(fraction * wi.shape[1]))
    masks[f'{block}/{wi_name}/kernel'] = jnp.asarray(np.broadcast_to(keep[None, :], wi.shape))
    masks[f'{block}/{wo_name}/kernel'] = jnp.asarray(np.broadcast_to(keep[:, None], wo.shape))
    if f'{block}/{wi_name}/bias' in named:
      masks[f'{block}/{wi_name}/bias'] = jnp.asarray(keep)
  return _masks_tree(params, masks)

"""Memory planning before launch: will this preset's train step fit the target accelerator?

The train step of a pretraining config is built exactly as `trainbig train` builds it (model,
mesh, sharded state, jitted step: `tasks.mlm.build_model`, `partitioning.make_mesh`,
`state.abstract_sharded_state`, `loop.jit_train_step`), lowered against abstract arrays (no
parameter is allocated) and compiled ahead of time. Per device:

  parameters, optimizer state   from the shardings of the state (exact: shard shapes x dtype)
  gradients                     one fp32 copy of the parameters' shards (XLA keeps it among
                                its temporaries; the split assumes gradients are sharded like
                                the parameters, which the optimizer update makes them)
  activations and temporaries   XLA's temporary buffers minus the gradients
  batch                         the step's input batch shard
  peak                          arguments + temporaries + outputs not aliased to arguments
FLOPs come from XLA's cost analysis of the per-device program.

Targets: a TPU generation compiles for that TPU's topology when JAX can describe it on this
host (`jax.experimental.topologies`, which needs libtpu: the `tpu` extra); otherwise, and for
GPUs and CPUs, the step compiles for as many simulated host devices as the mesh has (the
buffer sizes are the same program's; XLA's fusion choices, hence temporaries, differ between
backends, so leave headroom). `compiled_for` in the result says which was used.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.data.tokenizer import PAD_ID
from trainbig_jax.tasks import mlm as mlm_task
from trainbig_jax.train import loop, partitioning
from trainbig_jax.train.state import abstract_sharded_state, make_optimizer

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str
  hbm_bytes: int  # per device (TPU chip / GPU)
  platform: str   # 'tpu' | 'gpu'
  topology: str | None = None  # name in jax.experimental.topologies ('v5e', ...)


# HBM per device, from the vendors' pages:
#   TPU v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e (Trillium) 32 GiB: cloud.google.com/tpu/docs/
#     v4, /v5e, /v5p, /v6e ("System architecture" tables, HBM capacity per chip);
#   A100 40 GB and 80 GB: NVIDIA A100 Tensor Core GPU datasheet;
#   H100 SXM 80 GB: NVIDIA H100 datasheet; H200 141 GB: NVIDIA H200 datasheet.
ACCELERATORS = {a.name: a for a in (
    Accelerator('v4', 32 * GiB, 'tpu', 'v4'),
    Accelerator('v5e', 16 * GiB, 'tpu', 'v5e'),
    Accelerator('v5p', 95 * GiB, 'tpu', 'v5p'),
    Accelerator('v6e', 32 * GiB, 'tpu', 'v6e'),
    Accelerator('A100-40', 40 * GiB, 'gpu'),
    Accelerator('A100-80', 80 * GiB, 'gpu'),
    Accelerator('H100-80', 80 * GiB, 'gpu'),
    Accelerator('H200', 141 * 10 ** 9, 'gpu'),
)}
# Share of HBM a plan may use: the runtime, collectives' buffers and fragmentation need the
# rest. (JAX on GPU preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.)
USABLE_FRACTION = 0.9
# Chips -> TPU topology names JAX understands, for the common slice sizes.
_TPU_TOPOLOGIES = {
    '2d': {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
           256: '16x16'},
    '3d': {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
           256: '4x8x8'},
}
_TOPOLOGY_KIND = {'v4': '3d', 'v5p': '3d', 'v5e': '2d', 'v6e': '2d'}


class PlanError(ValueError):
  """A plan-memory argument is invalid."""


@dataclasses.dataclass
class MemoryPlan:
  preset: str
  mesh_shape: tuple[int, ...]
  accelerator: str
  compiled_for: str
  batch_size: int
  grad_accum_steps: int
  remat: str
  params_bytes: int
  optimizer_bytes: int
  gradient_bytes: int
  activation_bytes: int  # XLA temporaries other than the gradients
  batch_bytes: int
  peak_bytes: int
  capacity_bytes: int
  flops_per_device: float
  num_devices: int
  hint: str | None = None

  @property
  def usable_bytes(self) -> int:
    return int(self.capacity_bytes * USABLE_FRACTION)

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.usable_bytes


def get_accelerator(name: str) -> Accelerator:
  if name not in ACCELERATORS:
    raise PlanError(f'--accelerator={name!r} is unknown; allowed: {", ".join(ACCELERATORS)}.')
  return ACCELERATORS[name]


def parse_mesh(text: str) -> tuple[int, ...]:
  """'(1,8,1)' or '1,8,1' -> (1, 8, 1); every axis given (a plan has no device list to fill)."""
  parts = [p.strip() for p in str(text).strip().strip('()[]').split(',') if p.strip()]
  try:
    shape = tuple(int(p) for p in parts)
  except ValueError:
    shape = ()
  if len(shape) != len(partitioning.MESH_AXES) or any(s < 1 for s in shape):
    raise PlanError(f'--mesh={text!r} is invalid: give {len(partitioning.MESH_AXES)} positive '
                    f'sizes for {partitioning.MESH_AXES}, e.g. (1,8,1).')
  return shape


def _target_devices(accelerator: Accelerator, count: int) -> tuple[list, str]:
  """Devices to compile for: the TPU topology if JAX can describe it here, else host CPUs."""
  note = ''
  if accelerator.platform == 'tpu':
    shape = _TPU_TOPOLOGIES[_TOPOLOGY_KIND[accelerator.topology]].get(count)
    if shape is None:
      note = (f' standing in for {accelerator.name}: no topology of {count} chips is known '
              'here')
    else:
      try:
        from jax.experimental import topologies
        topology = topologies.get_topology_desc(f'{accelerator.topology}:{shape}', 'tpu')
        return list(topology.devices), f'{accelerator.name} topology {shape} (TPU compiler)'
      except Exception as e:  # no libtpu on this host: fall back, and say so
        reason = str(e).split(';')[0].split('. ')[0].strip() or type(e).__name__
        note = f' standing in for {accelerator.name}: its topology is unavailable ({reason})'
  devices = jax.devices()
  if len(devices) < count:
    raise PlanError(f'the mesh needs {count} devices but this process has {len(devices)} '
                    f'{devices[0].platform} devices; run plan-memory in a fresh process (it '
                    f'simulates as many host devices as the mesh needs).')
  if accelerator.platform != 'tpu':
    note = f' standing in for {accelerator.name}'
  return devices[:count], f'{count} simulated {devices[0].platform} devices{note}'


def compile_train_step(config: ml_collections.ConfigDict, devices: list):
  """The compiled train step of `config` on `devices`, and its abstract state."""
  tokenizer = types.SimpleNamespace(vocab_size=config.data.vocab_size, pad_id=PAD_ID)
  model = mlm_task.build_model(config, tokenizer)
  tx = make_optimizer(config.train)
  mesh = partitioning.make_mesh(config.mesh.shape, devices)
  init_params = mlm_task.init_params_fn(model, config)
  rules = partitioning.LOGICAL_AXIS_RULES
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings = abstract_sharded_state(init_params, tx, mesh)
    sums = mlm_task.sums_fn(model, config)
    step = loop.jit_train_step(sums, tx, config.train.grad_accum_steps, shardings, mesh)
    batch_sharding = partitioning.batch_sharding(mesh)
    shape = (config.train.batch_size, config.data.seq_len)
    batch = {'inputs': jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding),
             'targets': jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding),
             'weights': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding)}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    compiled = step.lower(state, batch, rng).compile()
  return compiled, state, batch


def shard_bytes(tree: Any) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', 0.0))


def measure(config: ml_collections.ConfigDict, accelerator: Accelerator,
            capacity_bytes: int | None = None) -> MemoryPlan:
  """Compiles `config`'s train step for `accelerator` and its mesh; the per-device breakdown."""
  mesh_shape = tuple(int(s) for s in config.mesh.shape)
  num_devices = math.prod(mesh_shape)
  mlm_task.check_config(config, num_devices)
  devices, compiled_for = _target_devices(accelerator, num_devices)
  measured = _measure_compiled(config.to_json(), tuple(devices))
  return MemoryPlan(
      preset=config.get('preset', 'custom'), mesh_shape=mesh_shape,
      accelerator=accelerator.name, compiled_for=compiled_for, batch_size=config.train.batch_size,
      grad_accum_steps=config.train.grad_accum_steps, remat=config.model.get('remat', 'none'),
      capacity_bytes=capacity_bytes or accelerator.hbm_bytes, num_devices=num_devices,
      **measured)


@functools.lru_cache(maxsize=64)
def _measure_compiled(config_json: str, devices: tuple) -> dict[str, Any]:
  """Byte counts of one compile, cached by config and target devices: a hint search, a
  re-plan, or two accelerators simulated by the same host devices compile once."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  config.mesh.shape = tuple(config.mesh.shape)
  compiled, state, batch = compile_train_step(config, list(devices))
  params = shard_bytes(state.params)
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  return {'params_bytes': params,
          'optimizer_bytes': shard_bytes(state.opt_state), 'gradient_bytes': params,
          'activation_bytes': max(0, temp - params), 'batch_bytes': shard_bytes(batch),
          'peak_bytes': peak_bytes(compiled), 'flops_per_device': _flops(compiled)}


def peak_bytes(compiled) -> int:
  """One device's peak of a compiled program: its arguments, XLA's temporaries, and the
  outputs that do not reuse (alias) a donated argument's buffer."""
  stats = compiled.memory_analysis()
  return (int(stats.argument_size_in_bytes) + int(stats.temp_size_in_bytes)
          + max(0, int(stats.output_size_in_bytes) - int(stats.alias_size_in_bytes)))


def _with(config: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  for path, value in changes.items():
    section, field = path.split('__')
    c[section][field] = value
  return c


def _remedies(config: ml_collections.ConfigDict, plan: MemoryPlan):
  """Changes to try, most preferred first: (flags, changed config), each cumulative.

  More fsdp first (it shards parameters and optimizer state without changing the math), then
  smaller micro-batches (activations shrink with them; the accumulated gradient is the same),
  then full rematerialisation (activations recomputed in the backward pass).
  """
  flags = []
  data, fsdp, tensor = plan.mesh_shape
  if data > 1:
    mesh = (1, data * fsdp, tensor)
    config = _with(config, mesh__shape=mesh)
    flags.append(f"--mesh='{','.join(map(str, mesh))}'")
    yield list(flags), config
  shards = config.mesh.shape[0] * config.mesh.shape[1]
  accum, batch = config.train.grad_accum_steps, config.train.batch_size
  # Activations scale with the micro-batch: start at the smallest power-of-two split predicted
  # to leave them room, then keep halving the micro-batch while it still divides.
  room = plan.usable_bytes - (plan.peak_bytes - plan.activation_bytes)
  factor = 2 ** max(1, math.ceil(math.log2(max(1.0, plan.activation_bytes / max(1, room)))))
  if room > 0:
    while batch % (accum * factor) == 0 and (batch // (accum * factor)) % shards == 0:
      yield (flags + [f'--config.train.grad_accum_steps={accum * factor}'],
             _with(config, train__grad_accum_steps=accum * factor))
      factor *= 2
  if config.model.get('remat', 'none') == 'none' and 'scan_layers' in config.model:
    yield (flags + ['--config.model.scan_layers=True', '--config.model.remat=full'],
           _with(_with(config, model__remat='full'), model__scan_layers=True))


def plan_memory(config: ml_collections.ConfigDict, mesh_shape: Sequence[int],
                accelerator_name: str, capacity_bytes: int | None = None,
                find_hint: bool = True, max_hint_compiles: int = 4) -> MemoryPlan:
  """The memory plan of `config` on `mesh_shape`; when it does not fit, a verified hint.

  A hint names changes under which the step was compiled again and fitted; at most
  `max_hint_compiles` candidates are compiled.
  """
  accelerator = get_accelerator(accelerator_name)
  config = _with(config, mesh__shape=tuple(int(s) for s in mesh_shape))
  plan = measure(config, accelerator, capacity_bytes)
  if plan.fits or not find_hint:
    return plan
  plan.hint = ('does not fit with more fsdp, smaller micro-batches or rematerialisation '
               'as tried here; use more devices or a smaller preset')
  for compiles, (flags, candidate) in enumerate(_remedies(config, plan)):
    if compiles >= max_hint_compiles:
      break
    trial = measure(candidate, accelerator, capacity_bytes)
    if trial.fits:
      plan.hint = (f'fits with {" ".join(flags)} (peak {_gib(trial.peak_bytes)} of '
                   f'{_gib(trial.usable_bytes)} usable)')
      break
  return plan


def _gib(n: float) -> str:
  return f'{n / GiB:.2f} GiB' if n >= GiB / 10 else f'{n / 2 ** 20:.2f} MiB'


def _flops_text(n: float) -> str:
  return next(f'{n / scale:.2f} {unit}' for scale, unit in ((1e12, 'T'), (1e9, 'G'), (1, ''))
              if n >= scale or scale == 1)


def format_plan(plan: MemoryPlan) -> str:
  rows = [('parameters', plan.params_bytes), ('optimizer state', plan.optimizer_bytes),
          ('gradients', plan.gradient_bytes),
          ('activations + temporaries', plan.activation_bytes), ('batch', plan.batch_bytes),
          ('peak (compiled)', plan.peak_bytes)]
  lines = [f'plan-memory: {plan.preset} on {plan.num_devices} x {plan.accelerator}, mesh '
           f'(data, fsdp, tensor)={plan.mesh_shape}, batch {plan.batch_size} in '
           f'{plan.grad_accum_steps} micro-batch(es), remat {plan.remat}',
           f'compiled for: {plan.compiled_for}',
           'per device:']
  lines += [f'  {name:<27}{_gib(n):>12}  ({n:,} bytes)' for name, n in rows]
  lines.append(f'  {"step FLOPs":<27}{_flops_text(plan.flops_per_device):>12}  per device, '
               f'{_flops_text(plan.flops_per_device * plan.num_devices)} in all')
  verdict = 'fits' if plan.fits else 'does NOT fit'
  lines.append(f'{verdict}: {plan.accelerator} has {_gib(plan.capacity_bytes)} per device, '
               f'{_gib(plan.usable_bytes)} usable ({USABLE_FRACTION:.0%})')
  if plan.hint:
    lines.append(f'hint: {plan.hint}')
  return '\n'.join(lines)


def grid_table(rows: list[MemoryPlan]) -> str:
  """Markdown table of plans (one a row)."""
  head = ('| preset | mesh | accelerator | params | optimizer | gradients | activations + temp '
          '| peak | usable | fits | TFLOPs/step (all devices) |\n'
          '| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |')
  body = [f'| {p.preset} | {p.mesh_shape} | {p.accelerator} | {_gib(p.params_bytes)} | '
          f'{_gib(p.optimizer_bytes)} | {_gib(p.gradient_bytes)} | {_gib(p.activation_bytes)} | '
          f'{_gib(p.peak_bytes)} | {_gib(p.usable_bytes)} | {"yes" if p.fits else "no"} | '
          f'{p.flops_per_device * p.num_devices / 1e12:.1f} |' for p in rows]
  return '\n'.join([head, *body])


GRID_PRESETS = (tuple(f'depth{d}' for d in pretrain_configs.DEPTH_GRID)
                + tuple(f'width{w}' for w in pretrain_configs.WIDTH_GRID))
_TABLE_HEADER = '# Memory plans of the paper\'s grids'


def write_grid_table(path: str | os.PathLike, mesh_shape: Sequence[int],
                     accelerator_names: Sequence[str], progress=print) -> Path:
  """Plans every depth and width grid preset (their default batch and sequence length) on
  each target and writes one section a target into `path`, replacing that target's earlier
  section and keeping the others."""
  accelerators = [get_accelerator(name) for name in accelerator_names]
  mesh_shape = tuple(int(s) for s in mesh_shape)
  rows = {a.name: [] for a in accelerators}
  for preset in GRID_PRESETS:
    config = _with(pretrain_configs.get_config(preset), mesh__shape=mesh_shape)
    for accelerator in accelerators:
      progress(f'plan-memory: {preset} on {accelerator.name} {mesh_shape}')
      rows[accelerator.name].append(measure(config, accelerator))
  path = Path(path)
  sections = _read_sections(path)
  c = pretrain_configs.get_config(GRID_PRESETS[0])
  mesh_flag = ','.join(map(str, mesh_shape))
  for accelerator in accelerators:
    title = f'## {accelerator.name}, mesh (data, fsdp, tensor) = {mesh_shape}'
    sections[title] = '\n'.join([
        title, '',
        f"Command: `trainbig plan-memory --all_presets --mesh='{mesh_flag}' "
        f"--accelerator={','.join(a.name for a in accelerators)}`. Each preset at its "
        f'defaults: global batch {c.train.batch_size} x {c.data.seq_len} tokens, '
        f'{c.train.grad_accum_steps} micro-batch, fp32, AdamW, no remat; bytes per device. '
        f'Compiled for: {rows[accelerator.name][0].compiled_for}.', '',
        grid_table(rows[accelerator.name]), ''])
  intro = (f'{_TABLE_HEADER}\n\nWritten by `trainbig plan-memory --all_presets` (see '
           '`trainbig_jax/train/memory.py` for what each column counts and how). "usable" is '
           f'{USABLE_FRACTION:.0%} of the accelerator\'s HBM. For a preset that does not fit, '
           'a single-preset `trainbig plan-memory` call gives a hint verified by compiling '
           'again.\n')
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.md.tmp')
  tmp.write_text('\n'.join([intro, *sections.values()]))
  tmp.replace(path)
  return path


def _read_sections(path: Path) -> dict[str, str]:
  """'## ...' sections of an earlier table file, by title, in order."""
  if not path.exists():
    return {}
  sections, title = {}, None
  for line in path.read_text().splitlines():
    if line.startswith('## '):
      title = line
      sections[title] = []
    if title is not None:
      sections[title].append(line)
  return {t: '\n'.join(lines).rstrip('\n') + '\n' for t, lines in sections.items()}

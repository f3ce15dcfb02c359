"""Device mesh and the logical-axis rules that map model axis names onto it.

The mesh has three axes: 'data' (pure data parallel), 'fsdp' (data parallel with parameters
and optimizer state sharded along the embedding dimension) and 'tensor' (Megatron-style:
heads, MLP and vocabulary dimensions split across devices). The axes are created as
`AxisType.Auto`: Flax linen's logical partitioning emits GSPMD sharding constraints, which
is the automatic mode; jax >= 0.7 defaults `make_mesh` to Explicit axes, so we choose it here.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from trainbig_jax.models import axes

MESH_AXES = ('data', 'fsdp', 'tensor')

# (logical name, mesh axes). Parameters: embed over fsdp, heads/mlp/vocab over tensor.
# Activations: batch over data+fsdp, hidden features over tensor where the weights are.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (axes.BATCH, ('data', 'fsdp')),
    (axes.LENGTH, None),
    (axes.ACT_EMBED, None),
    (axes.ACT_HEADS, 'tensor'),
    (axes.ACT_MLP, 'tensor'),
    (axes.VOCAB, 'tensor'),
    (axes.EMBED, 'fsdp'),
    (axes.HEADS, 'tensor'),
    (axes.MLP, 'tensor'),
    (axes.POSITION, None),
    (axes.CLASSES, None),
)


class MeshError(ValueError):
  """The configured mesh does not fit the available devices."""


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills in one -1 entry so that the product equals `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES) or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise MeshError(f'mesh.shape={shape} is invalid: give {len(MESH_AXES)} sizes for '
                    f'{MESH_AXES}, each positive or one of them -1.')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise MeshError(f'mesh.shape={shape} does not fit {num_devices} devices: '
                      f'{num_devices} is not divisible by {known}.')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise MeshError(f'mesh.shape={shape} needs {int(np.prod(shape))} devices but '
                    f'{num_devices} are available; sizes must multiply to {num_devices}.')
  return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  resolved = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(resolved, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_shardings(logical_specs, mesh: Mesh):
  """PartitionSpecs of logical names -> NamedShardings on `mesh` under our rules."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's share of a batch into global arrays sharded over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}

"""Compressed checkpoints that really store packed integers, and their true byte counts.

Per parameter leaf, one of four encodings:
  dense             the array as is (its own dtype)
  pruned            only the kept values (own dtype) + the mask
  quantized         b-bit codes packed densely into bytes + scale (+ zero point)
  pruned_quantized  only the kept codes, packed + mask + scale (+ zero point)

Packing: codes are stored unsigned (symmetric codes offset by 2^(b-1)); value i
occupies bits [b*i, b*(i+1)) of a little-endian bit stream, so 8-bit codes are the
bytes themselves and 4-bit codes go two per byte, low nibble first. The stream takes
ceil(n*b/8) bytes. Masks are stored as whichever is smaller: a bitmap (np.packbits,
big-endian bit order, ceil(n/8) bytes) or the delta-coded flat indices of the kept
entries (first delta = first index) in the narrowest unsigned dtype that holds the
largest gap ('delta_uint8' | 'delta_uint16' | 'delta_uint32').

On disk (`save_compressed`):
  <directory>/manifest.json   format, version, per-leaf entries (each payload array's dtype,
                              shape, bytes and the SHA-256 of its bytes), totals, user extra
  <directory>/arrays/         an Orbax StandardCheckpointer checkpoint of the payload
                              arrays, nested like the params: <path>/{values,mask,scale,
                              zero_point}; zero-size arrays are not written (Orbax
                              refuses them) and are rebuilt from the manifest.
The directory appears atomically (built in a temporary sibling, then renamed), so a
directory with no manifest.json is never a finished checkpoint. Loading checks every payload
array against its SHA-256 in the manifest, so altered bytes never evaluate silently (format
version 1, written before checksums, is still read, unchecked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from trainbig_jax.compress.prune import masks_by_path, select_paths
from trainbig_jax.compress.quantize import QuantizedTensor, check_bits, dequantize, quantize
from trainbig_jax.models.layout import LAYER_KERNELS, path_str
from trainbig_jax.train import checkpoint

PyTree = Any
FORMAT_NAME = 'trainbig_jax.compressed_params'
FORMAT_VERSION = 2  # 2: payload checksums in the manifest
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = 'manifest.json'
ARRAYS_DIR = 'arrays'
# Pack in chunks of this many codes (a multiple of 8) to bound the uint64 scratch memory.
_PACK_CHUNK = 1 << 22


class CompressedCheckpointError(ValueError):
  """A compressed checkpoint directory is incomplete, corrupt, or not one of ours."""


# ----------------------------------------------------------------- bit packing


def packed_size(count: int, bits: int) -> int:
  """Bytes needed for `count` codes of `bits` bits."""
  return -(-count * bits // 8)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
  """Packs unsigned codes (each < 2**bits) into a uint8 stream of ceil(n*bits/8) bytes."""
  bits = check_bits(bits)
  codes = np.asarray(codes).ravel()
  if codes.size and (codes.min() < 0 or codes.max() >= 2 ** bits):
    raise ValueError(f'Codes must lie in [0, {2 ** bits - 1}] for {bits}-bit packing, got range '
                     f'[{codes.min()}, {codes.max()}].')
  if bits == 8:
    return codes.astype(np.uint8)
  shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
  chunks = []
  for start in range(0, codes.size, _PACK_CHUNK):
    chunk = codes[start:start + _PACK_CHUNK]
    groups = np.zeros((-(-chunk.size // 8), 8), np.uint64)
    groups.ravel()[:chunk.size] = chunk
    # 8 codes of b bits fill exactly b bytes of one little-endian 64-bit word.
    words = np.bitwise_or.reduce(groups << shifts, axis=1).astype('<u8')
    chunks.append(words.view(np.uint8).reshape(-1, 8)[:, :bits].ravel())
  packed = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
  # Every chunk but the last is a multiple of 8 codes, so only the tail is padded.
  return packed[:packed_size(codes.size, bits)]


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  """Inverse of pack_bits: the first `count` codes as uint8."""
  bits = check_bits(bits)
  packed = np.asarray(packed, np.uint8).ravel()
  if packed.size != packed_size(count, bits):
    raise ValueError(f'{count} codes of {bits} bits need {packed_size(count, bits)} bytes, got '
                     f'{packed.size}.')
  if bits == 8:
    return packed.copy()
  groups = -(-count // 8)
  padded = np.zeros(groups * bits, np.uint8)
  padded[:packed.size] = packed
  word_bytes = np.zeros((groups, 8), np.uint8)
  word_bytes[:, :bits] = padded.reshape(groups, bits)
  words = word_bytes.view('<u8')  # [groups, 1]
  shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
  codes = (words >> shifts) & np.uint64(2 ** bits - 1)
  return codes.astype(np.uint8).ravel()[:count]


# --------------------------------------------------------------- mask encoding


def encode_mask(mask: np.ndarray) -> tuple[str, np.ndarray]:
  """(encoding, data): the smaller of a bitmap and delta-coded kept indices."""
  flat = np.asarray(mask, bool).ravel()
  bitmap = np.packbits(flat)
  kept = np.flatnonzero(flat)
  deltas = np.diff(kept, prepend=0)
  largest = int(deltas.max()) if deltas.size else 0
  for dtype in (np.uint8, np.uint16, np.uint32):
    if largest <= np.iinfo(dtype).max:
      if deltas.size * np.dtype(dtype).itemsize < bitmap.size:
        return f'delta_{np.dtype(dtype).name}', deltas.astype(dtype)
      break
  return 'bitmap', bitmap


def decode_mask(encoding: str, data: np.ndarray, shape: Iterable[int]) -> np.ndarray:
  """Inverse of encode_mask: a bool array of `shape`."""
  shape = tuple(shape)
  size = int(np.prod(shape))
  if encoding == 'bitmap':
    return np.unpackbits(np.asarray(data, np.uint8), count=size).astype(bool).reshape(shape)
  if encoding.startswith('delta_'):
    mask = np.zeros(size, bool)
    mask[np.cumsum(np.asarray(data), dtype=np.int64)] = True
    return mask.reshape(shape)
  raise CompressedCheckpointError(f'Unknown mask encoding {encoding!r}.')


# ------------------------------------------------------------- compress / expand


@dataclasses.dataclass(frozen=True)
class CompressedParams:
  """In-memory compressed parameters.

  payload: {path: {'values'|'mask'|'scale'|'zero_point': numpy array}}, the bytes
    that get stored.
  leaves: {path: manifest entry}, JSON-serializable descriptions (see `_leaf_entry`).
  Both are keyed by '/'-joined paths in the original tree order.
  """
  payload: dict[str, dict[str, np.ndarray]]
  leaves: dict[str, dict[str, Any]]


def _sha256(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _array_info(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  return {name: dict(dtype=a.dtype.name, shape=list(a.shape), nbytes=int(a.nbytes),
                     sha256=_sha256(a))
          for name, a in arrays.items()}


def _check_quant(quant: Mapping[str, Any]) -> dict[str, Any]:
  allowed = {'bits', 'symmetric', 'per_channel', 'channel_axis'}
  unknown = set(quant) - allowed
  if unknown or 'bits' not in quant:
    raise ValueError(f'quant must be a dict with "bits" and optionally symmetric, per_channel, '
                     f'channel_axis; got keys {sorted(quant)}.')
  return dict(bits=check_bits(quant['bits']), symmetric=bool(quant.get('symmetric', True)),
              per_channel=bool(quant.get('per_channel', True)),
              channel_axis=int(quant.get('channel_axis', -1)))


def _named_leaves(params: PyTree) -> dict[str, Any]:
  """{path: leaf} for a tree of nested string-keyed dicts (QuantizedTensor leaves allowed)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, QuantizedTensor))
  named = {}
  for key_path, leaf in flat:
    names = [getattr(k, 'key', None) for k in key_path]
    if not all(isinstance(n, str) and n and '/' not in n for n in names):
      raise ValueError(f'compress_tree needs nested dicts with non-empty string keys without "/"; '
                       f'got key path {jax.tree_util.keystr(key_path)}.')
    named[path_str(key_path)] = leaf
  return named


def _compact_scale(scale: Any) -> np.ndarray:
  """Scales in float16 when that is lossless (quantize rounds them so), else float32."""
  scale = np.asarray(scale, np.float32)
  half = scale.astype(np.float16)
  return half if np.array_equal(half.astype(np.float32), scale) else scale


def _encode_codes(q: QuantizedTensor, mask: np.ndarray | None) -> dict[str, np.ndarray]:
  codes = np.asarray(q.values)
  if q.symmetric:
    # [-(2^(b-1)-1), 2^(b-1)-1] -> [1, 2^b - 1]: unsigned, fits b bits.
    codes = (codes.astype(np.int16) + 2 ** (q.bits - 1)).astype(np.uint8)
  kept = codes[mask] if mask is not None else codes.ravel()
  arrays = dict(values=pack_bits(kept, q.bits), scale=_compact_scale(q.scale))
  if not q.symmetric:
    arrays['zero_point'] = np.asarray(q.zero_point).astype(np.uint8)  # in [0, 2^b - 1]
  return arrays


def compress_tree(params: PyTree, masks: PyTree | None = None,
                  quant: Mapping[str, Any] | None = None, *,
                  include: str | Iterable[str] = LAYER_KERNELS,
                  exclude: str | Iterable[str] = ()) -> CompressedParams:
  """Encodes a param tree (nested dicts) for storage.

  masks: a mask tree (see prune.py) or None; masked leaves store only kept entries.
  quant: None or dict(bits, symmetric=True, per_channel=True, channel_axis=-1):
    quantizes the leaves selected by include/exclude (after zeroing pruned entries,
    so scales come from kept weights). Leaves that already are QuantizedTensor (from
    quantize_tree) are stored as they are; with a mask their pruned positions load
    as exactly 0.
  """
  named = _named_leaves(params)
  leaf_masks = {} if masks is None else {p: np.asarray(m, bool)
                                         for p, m in masks_by_path(masks).items()}
  for path, mask in leaf_masks.items():
    if path not in named or tuple(mask.shape) != tuple(np.shape(named[path])):
      raise ValueError(f'Mask for {path!r} with shape {mask.shape} has no parameter of that '
                       f'shape.')
  quant = None if quant is None else _check_quant(quant)
  to_quantize = set() if quant is None else set(select_paths(list(named), include, exclude))

  payload, leaves = {}, {}
  for path, leaf in named.items():
    mask = leaf_masks.get(path)
    entry: dict[str, Any] = dict(path=path, shape=list(np.shape(leaf)))
    if isinstance(leaf, QuantizedTensor) or path in to_quantize:
      if isinstance(leaf, QuantizedTensor):
        q = leaf
      else:
        x = np.asarray(leaf)
        q = quantize(np.where(mask, x, 0) if mask is not None else x, quant['bits'],
                     symmetric=quant['symmetric'], per_channel=quant['per_channel'],
                     channel_axis=quant['channel_axis'])
      arrays = _encode_codes(q, mask)
      entry.update(dtype=q.dtype, bits=q.bits, symmetric=q.symmetric,
                   per_channel=q.per_channel, channel_axis=q.channel_axis,
                   encoding='pruned_quantized' if mask is not None else 'quantized')
    else:
      x = np.asarray(leaf)
      arrays = dict(values=x[mask] if mask is not None else x)
      entry.update(dtype=x.dtype.name, encoding='pruned' if mask is not None else 'dense')
    entry['stored_values'] = int(mask.sum()) if mask is not None else int(np.prod(entry['shape']))
    if mask is not None:
      entry['mask_encoding'], arrays['mask'] = encode_mask(mask)
    entry['arrays'] = _array_info(arrays)
    entry['bytes'] = sum(info['nbytes'] for info in entry['arrays'].values())
    payload[path], leaves[path] = arrays, entry
  return CompressedParams(payload=payload, leaves=leaves)


def _expand_leaf(entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> np.ndarray:
  """Dense array of one leaf from its manifest entry and payload arrays."""
  shape, encoding = tuple(entry['shape']), entry['encoding']
  mask = (decode_mask(entry['mask_encoding'], arrays['mask'], shape)
          if encoding.startswith('pruned') else None)
  if encoding == 'dense':
    return np.asarray(arrays['values']).reshape(shape)
  if encoding == 'pruned':
    dense = np.zeros(shape, arrays['values'].dtype)
    dense[mask] = arrays['values']
    return dense
  if encoding not in ('quantized', 'pruned_quantized'):
    raise CompressedCheckpointError(f'Unknown encoding {encoding!r} for {entry["path"]!r}.')
  # The same dequantize as quantize.py, so loaded weights match it bit for bit.
  return np.asarray(dequantize(_quantized_leaf(entry, arrays, mask)))


def _quantized_leaf(entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                    mask: np.ndarray | None) -> QuantizedTensor:
  """The full-shape codes of a (pruned_)quantized leaf, pruned entries at the zero point."""
  shape = tuple(entry['shape'])
  bits, symmetric = entry['bits'], entry['symmetric']
  codes = unpack_bits(arrays['values'], bits, entry['stored_values'])
  scale = np.asarray(arrays['scale'], np.float32)
  if symmetric:
    codes = (codes.astype(np.int16) - 2 ** (bits - 1)).astype(np.int8)
    zero_point = np.zeros(scale.shape, np.int32)
  else:
    zero_point = np.asarray(arrays['zero_point']).astype(np.int32)
  if mask is not None:
    # Pruned codes sit at the zero point, so they dequantize to exactly 0.0.
    full = np.broadcast_to(zero_point.astype(codes.dtype), shape).copy()
    full[mask] = codes
  else:
    full = codes.reshape(shape)
  return QuantizedTensor(values=full, scale=scale, zero_point=zero_point, bits=bits,
                         symmetric=symmetric, channel_axis=entry['channel_axis'],
                         dtype=entry['dtype'])


def quantized_leaves(compressed: CompressedParams) -> dict[str, QuantizedTensor]:
  """{path: QuantizedTensor} of the quantized leaves, with their stored codes (for integer
  inference, compress/int8.py); pruned entries hold the zero point."""
  result = {}
  for path, entry in compressed.leaves.items():
    if entry['encoding'] in ('quantized', 'pruned_quantized'):
      arrays = compressed.payload[path]
      mask = (decode_mask(entry['mask_encoding'], arrays['mask'], tuple(entry['shape']))
              if entry['encoding'] == 'pruned_quantized' else None)
      result[path] = _quantized_leaf(entry, arrays, mask)
  return result


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, last = path.split('/')
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[last] = value
  return tree


def decompress_tree(compressed: CompressedParams) -> dict[str, Any]:
  """Dense numpy param tree (quantized leaves as float32, pruned entries 0.0)."""
  return _nest({path: _expand_leaf(entry, compressed.payload[path])
                for path, entry in compressed.leaves.items()})


# --------------------------------------------------------------------- on disk


def _dir_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(directory) for f in files)


def save_compressed(directory: str | os.PathLike, compressed: CompressedParams,
                    manifest_extra: Mapping[str, Any] | None = None) -> str:
  """Writes `compressed` to a new directory atomically; returns its absolute path.

  Refuses an existing path. Everything is written into a temporary sibling that is
  renamed into place at the end and removed if anything fails, so the target either
  holds a complete checkpoint or does not exist.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.lexists(directory):
    raise FileExistsError(f'Output directory {directory} already exists; choose a new path '
                          f'or remove it first.')
  totals = stored_bytes(compressed)
  manifest = dict(format=FORMAT_NAME, format_version=FORMAT_VERSION, arrays_dir=ARRAYS_DIR,
                  leaves=list(compressed.leaves.values()),
                  totals=dict(compressed_bytes=totals['compressed_bytes'],
                              dense_fp32_bytes=totals['dense_fp32_bytes']),
                  extra=dict(manifest_extra or {}))
  try:
    manifest_text = json.dumps(manifest, indent=1)  # fail before writing anything
  except (TypeError, ValueError) as err:
    raise ValueError(f'manifest_extra must be JSON-serializable: {err}.') from None
  # Zero-size arrays are skipped: Orbax refuses them and the manifest rebuilds them.
  arrays = _nest({f'{path}/{name}': a for path, leaf_arrays in compressed.payload.items()
                  for name, a in leaf_arrays.items() if a.size})

  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(directory)}.tmp-', dir=parent)
  try:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
      checkpointer.save(os.path.join(staging, ARRAYS_DIR), args=ocp.args.StandardSave(arrays))
    # The manifest goes last: its presence marks a complete checkpoint.
    with open(os.path.join(staging, MANIFEST_FILE), 'w') as f:
      f.write(manifest_text)
    os.rename(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return directory


def _read_manifest(directory: str) -> dict[str, Any]:
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'No compressed checkpoint at {directory}: the directory does not '
                            f'exist.')
  manifest_path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.isfile(manifest_path):
    raise CompressedCheckpointError(f'{directory} is not a complete compressed checkpoint: '
                                    f'{MANIFEST_FILE} is missing (half-written or not made by '
                                    f'save_compressed).')
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as err:
    raise CompressedCheckpointError(f'Cannot read {manifest_path}: {err}.') from None
  if (not isinstance(manifest, dict) or manifest.get('format') != FORMAT_NAME
      or manifest.get('format_version') not in READABLE_VERSIONS):
    manifest = manifest if isinstance(manifest, dict) else {}
    raise CompressedCheckpointError(
        f'{manifest_path} is format {manifest.get("format")!r} version '
        f'{manifest.get("format_version")!r}; expected {FORMAT_NAME!r} version '
        f'{" or ".join(map(str, READABLE_VERSIONS))}.')
  return manifest


def _read_payload(directory: str, manifest: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  arrays_dir = os.path.join(directory, manifest['arrays_dir'])
  try:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(arrays_dir)
  except Exception as err:  # Orbax raises many types; the user needs one message.
    checkpoint.ignore_abandoned_reads()
    raise CompressedCheckpointError(f'Cannot read the arrays of compressed checkpoint '
                                    f'{arrays_dir}: {checkpoint.failure_gist(err)}') from None
  checked = manifest['format_version'] >= 2
  payload = {}
  for entry in manifest['leaves']:
    node = restored
    for name in entry['path'].split('/'):
      node = node.get(name, {}) if isinstance(node, Mapping) else {}
    leaf_arrays = {}
    for name, info in entry['arrays'].items():
      if int(np.prod(info['shape'])) == 0:
        leaf_arrays[name] = np.zeros(info['shape'], info['dtype'])
        continue
      if name not in node:
        raise CompressedCheckpointError(f'Compressed checkpoint {directory} lacks array '
                                        f'{name!r} of {entry["path"]!r}.')
      array = np.asarray(node[name])
      if array.dtype.name != info['dtype'] or list(array.shape) != info['shape']:
        raise CompressedCheckpointError(
            f'Array {name!r} of {entry["path"]!r} in {directory} is {array.dtype}{array.shape}, '
            f'the manifest says {info["dtype"]}{tuple(info["shape"])}.')
      if checked and info.get('sha256') != _sha256(array):
        raise CompressedCheckpointError(
            f'Array {name!r} of {entry["path"]!r} in {arrays_dir} does not match its checksum '
            f'in {os.path.join(directory, MANIFEST_FILE)}: the file was altered or damaged.')
      leaf_arrays[name] = array
    payload[entry['path']] = leaf_arrays
  return payload


def read_compressed(directory: str | os.PathLike) -> tuple[CompressedParams, dict[str, Any]]:
  """The stored CompressedParams (still packed) and the manifest."""
  directory = os.path.abspath(os.fspath(directory))
  manifest = _read_manifest(directory)
  payload = _read_payload(directory, manifest)
  leaves = {entry['path']: entry for entry in manifest['leaves']}
  return CompressedParams(payload=payload, leaves=leaves), manifest


def load_compressed(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """(dense numpy param tree, manifest): dequantized, pruned entries scattered back as 0."""
  compressed, manifest = read_compressed(directory)
  return decompress_tree(compressed), manifest


def stored_bytes(source: CompressedParams | str | os.PathLike) -> dict[str, Any]:
  """True storage cost versus dense fp32.

  compressed_bytes: payload bytes actually stored (packed codes, masks, scales,
  zero points, dense and pruned values). dense_fp32_bytes: 4 bytes per parameter.
  per_leaf: {path: {values, mask, scale, zero_point, total, dense_fp32}}. For a
  directory also disk_bytes: all files on disk (Orbax metadata + its zstd-compressed
  chunks + manifest), which can be below compressed_bytes for compressible payloads.
  """
  disk_bytes = None
  if isinstance(source, CompressedParams):
    entries = [dict(entry, arrays=_array_info(source.payload[path]))
               for path, entry in source.leaves.items()]
  else:
    directory = os.path.abspath(os.fspath(source))
    entries = _read_manifest(directory)['leaves']
    disk_bytes = _dir_bytes(directory)
  per_leaf = {}
  for entry in entries:
    counts = {name: entry['arrays'].get(name, {}).get('nbytes', 0)
              for name in ('values', 'mask', 'scale', 'zero_point')}
    counts['total'] = sum(counts.values())
    counts['dense_fp32'] = 4 * int(np.prod(entry['shape']))
    per_leaf[entry['path']] = counts
  compressed = sum(c['total'] for c in per_leaf.values())
  dense = sum(c['dense_fp32'] for c in per_leaf.values())
  result = dict(compressed_bytes=compressed, dense_fp32_bytes=dense,
                compression_ratio=dense / compressed if compressed else float('inf'),
                per_leaf=per_leaf)
  if disk_bytes is not None:
    result['disk_bytes'] = disk_bytes
  return result

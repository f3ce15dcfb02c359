"""Damage to a saved checkpoint of the kind a crash or a full disk leaves, for fault tests."""

from __future__ import annotations

import os
from pathlib import Path


def array_files(step_dir: Path) -> list[Path]:
  """The files holding a checkpoint step's array data (TensorStore's OCDBT `d/` files)."""
  return [p for p in (step_dir / 'state').rglob('*') if p.is_file() and '/d/' in str(p)]


def largest_array_file(step_dir: Path) -> Path:
  return max(array_files(step_dir), key=lambda p: p.stat().st_size)


def truncate_array_files(step_dir: Path) -> None:
  """Cuts every array data file of the step to a third.

  Truncated, not altered: flipped bytes can land in chunk data that TensorStore reads back
  without a checksum, so such a checkpoint sometimes restores (with wrong values) and a test
  on it would pass or fail by chance; truncation cuts off byte ranges that the OCDBT index
  refers to, which every read detects. Every file, not one: which arrays share a file depends
  on the Orbax and TensorStore versions (with jax 0.11.2 the largest file held only optimizer
  moments, which evaluation never reads), and each command must find the damage in what it
  reads.
  """
  for path in array_files(step_dir):
    os.truncate(path, path.stat().st_size // 3)

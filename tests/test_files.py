"""Atomic writes and JSON-lines reading (trainbig_jax/files.py)."""

import pytest

from trainbig_jax import files
from trainbig_jax.train.metrics import read_metrics


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
  path = tmp_path / 'config.json'
  files.atomic_write(path, '{"old": 1}')
  files.atomic_write(path, b'{"new": 2}')
  assert path.read_text() == '{"new": 2}'
  assert [p.name for p in tmp_path.iterdir()] == ['config.json']


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
  path = tmp_path / 'summary.json'
  files.atomic_write(path, 'old')
  with pytest.raises(TypeError):
    files.atomic_write(path, 12345)  # not str or bytes: fails while writing the temporary
  assert path.read_text() == 'old'
  assert [p.name for p in tmp_path.iterdir()] == ['summary.json']


def test_read_jsonl_drops_only_a_torn_last_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 0}\n\n{"step": 1}\n{"step": 2, "eval_lo')
  assert files.read_jsonl(path) == [(1, {'step': 0}), (3, {'step': 1})]
  assert read_metrics(tmp_path) == [{'step': 0}, {'step': 1}]
  path.write_text('{"step": 0}\n{"step": 1, "eval_lo\n{"step": 2}\n')
  with pytest.raises(files.JsonlError, match=r'metrics\.jsonl, line 2: not valid JSON'):
    read_metrics(path)
  path.write_text('{"step": 0}\n[1, 2]\n{"step": 2}\n')
  with pytest.raises(files.JsonlError, match='line 2: expected a JSON object, got list'):
    files.read_jsonl(path)


def test_append_jsonl_cuts_a_torn_last_line_first(tmp_path):
  path = tmp_path / 'results.jsonl'
  files.append_jsonl(path, {'cell': 'a'})  # creates the file
  with open(path, 'a') as f:
    f.write('{"cell": "b", "acc')  # an append killed half-way
  files.append_jsonl(path, {'cell': 'b'})
  assert path.read_text() == '{"cell": "a"}\n{"cell": "b"}\n'
  assert [row for _, row in files.read_jsonl(path)] == [{'cell': 'a'}, {'cell': 'b'}]

"""Compression as checkpoint transforms: `compress_checkpoint`, `evaluate_checkpoint` and
their CLI commands on a really pretrained (tiny) run."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from trainbig_jax.compress import storage
from trainbig_jax.compress.checkpoints import (compress_checkpoint, compress_params,
                                               load_checkpoint_params)
from trainbig_jax.configs import compress as compress_configs
from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.evaluate import evaluate_checkpoint
from trainbig_jax.train import checkpoint
from trainbig_jax.train.metrics import read_metrics
from trainbig_jax.tasks.mlm import pretrain

REPO = Path(__file__).parents[1]
EVAL_KEYS = {'eval_loss', 'eval_accuracy', 'total_params', 'nonzero_params', 'stored_bytes',
             'dense_fp32_bytes'}
COMPRESS_KEYS = {'out', 'source', 'compressed_bytes', 'dense_fp32_bytes', 'compression_ratio',
                 'total_params', 'nonzero_params', 'selected_params', 'selected_nonzero_params',
                 'selected_stored_bytes', 'selected_dense_fp32_bytes'}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny MLM run (2 layers x 64 wide, 2 heads) trained far enough to have learned something.

  Tiny MLM models first learn the unigram distribution and only slowly start to use context,
  so their layer kernels matter little; 400 steps at 3e-3 is the cheapest setting measured
  where pruning 90% of them costs clearly more eval loss than 8-bit quantization (~20 s).
  """
  workdir = tmp_path_factory.mktemp('pretrained')
  c = pretrain_configs.get_config('tiny')
  c.model.hidden, c.model.mlp_dim = 64, 256
  c.train.total_steps, c.train.learning_rate = 400, 3e-3
  c.train.eval_every, c.train.checkpoint_every = 200, 400
  pretrain(c, workdir)
  evals = [r['eval_loss'] for r in read_metrics(workdir) if 'eval_loss' in r]
  assert evals[-1] < evals[0] - 0.4, evals  # it learned something
  return workdir


@pytest.fixture(scope='module')
def dense_eval(run):
  return evaluate_checkpoint(run)


def compress_config(preset, **overrides):
  c = compress_configs.get_config(preset)
  for field, value in overrides.items():
    section, name = field.split('.')
    c[section][name] = value
  return c


def compressed(run, tmp_path, preset, **overrides):
  out = tmp_path / preset
  return out, compress_checkpoint(run, compress_config(preset, **overrides), out)


def test_dense_eval_reports_storage_facts(dense_eval):
  assert EVAL_KEYS <= set(dense_eval)
  assert dense_eval['checkpoint_kind'] == 'dense'
  assert dense_eval['task'] == 'mlm'
  total = dense_eval['total_params']
  assert dense_eval['stored_bytes'] == dense_eval['dense_fp32_bytes'] == 4 * total
  assert dense_eval['nonzero_params'] == total  # trained weights have no exact zeros
  assert 0 < dense_eval['eval_loss'] < np.log(512)


def test_int8_is_nearly_free_and_prune90_is_not(run, dense_eval, tmp_path):
  changes = {}
  for preset in ('int8', 'prune90'):
    out, _ = compressed(run, tmp_path, preset)
    result = evaluate_checkpoint(out)
    assert EVAL_KEYS <= set(result)
    assert result['stored_bytes'] < dense_eval['stored_bytes']
    changes[preset] = abs(result['eval_loss'] - dense_eval['eval_loss'])
  print(f"dense eval_loss {dense_eval['eval_loss']:.5f}; |change| int8 {changes['int8']:.2e} "
        f"({changes['int8'] / dense_eval['eval_loss']:.2e} relative), prune90 "
        f"{changes['prune90']:.4f} ({changes['prune90'] / dense_eval['eval_loss']:.2e} relative)")
  assert changes['int8'] < 0.01 * dense_eval['eval_loss']
  # Measured: int8 ~1e-5, prune90 0.02..0.05 nats across seeds (the tiny model relies on its
  # layer kernels only weakly, see the fixture).
  assert changes['prune90'] > 10 * changes['int8']
  assert changes['prune90'] > 0.01


def test_prune50_int4_counts_and_bytes(run, dense_eval, tmp_path):
  out, summary = compressed(run, tmp_path, 'prune50_int4')
  assert COMPRESS_KEYS <= set(summary)
  assert summary['out'] == str(out.absolute())
  half = summary['selected_params'] // 2
  assert summary['selected_params'] == 2 * half
  assert summary['selected_nonzero_params'] == half
  result = evaluate_checkpoint(out)
  assert result['checkpoint_kind'] == 'compressed'
  assert result['total_params'] == dense_eval['total_params'] == summary['total_params']
  assert result['nonzero_params'] == summary['nonzero_params']
  assert dense_eval['nonzero_params'] - result['nonzero_params'] == half
  assert result['stored_bytes'] == summary['compressed_bytes'] < dense_eval['stored_bytes']
  assert result['dense_fp32_bytes'] == dense_eval['dense_fp32_bytes']
  ratio = summary['selected_stored_bytes'] / summary['selected_dense_fp32_bytes']
  print(f'prune50_int4: selected matrices stored in {ratio:.4f} of their fp32 bytes; whole '
        f"model {result['stored_bytes'] / result['dense_fp32_bytes']:.4f}")
  # 4-bit codes of half the weights (1/16) + a 1-bit mask (1/32) + float16 scales.
  assert ratio <= 0.10


def test_compressed_checkpoint_loads_to_exactly_the_dequantized_tree(run, tmp_path):
  config = compress_config('prune50_int4')
  out = tmp_path / 'out'
  compress_checkpoint(run, config, out)
  loaded, facts = load_checkpoint_params(out)
  assert facts['checkpoint_kind'] == 'compressed'
  num_heads = checkpoint.read_config(run).model.num_heads
  expected = storage.decompress_tree(compress_params(checkpoint.restore_params(run), config,
                                                     num_heads))
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)

  def same(a, b):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(a, b)
  jax.tree.map(same, loaded, expected)


def test_heads50_zeroes_one_of_two_heads(run, tmp_path):
  config = checkpoint.read_config(run)
  assert config.model.num_heads == 2
  head_dim = config.model.hidden // 2
  out, _ = compressed(run, tmp_path, 'heads50')
  params, _ = load_checkpoint_params(out)
  dense = checkpoint.restore_params(run)
  for i in range(config.model.num_layers):
    attention = params[f'layers_{i}']['attention']
    zero_heads = set()
    for name in ('query', 'key', 'value'):
      kernel = attention[name]['kernel'].reshape(config.model.hidden, 2, head_dim)
      zero = [h for h in range(2) if not np.any(kernel[:, h])]
      assert len(zero) == 1, (i, name)
      kept = 1 - zero[0]
      np.testing.assert_array_equal(
          kernel[:, kept], dense[f'layers_{i}']['attention'][name]['kernel']
          .reshape(config.model.hidden, 2, head_dim)[:, kept])
      zero_heads.add(zero[0])
      bias = attention[name]['bias'].reshape(2, head_dim)
      assert not np.any(bias[zero[0]]) and np.any(bias[kept])
    assert len(zero_heads) == 1  # the same head in query, key and value
    head = zero_heads.pop()
    out_kernel = attention['out']['kernel'].reshape(2, head_dim, config.model.hidden)
    assert not np.any(out_kernel[head]) and np.all(out_kernel[1 - head] != 0)
    # MLP kernels are not touched by head pruning.
    np.testing.assert_array_equal(params[f'layers_{i}']['mlp']['wi']['kernel'],
                                  dense[f'layers_{i}']['mlp']['wi']['kernel'])


# ------------------------------------------------------------------------------ bad input


def assert_nothing_written(out):
  assert not out.exists()
  assert not list(out.parent.glob(f'.{out.name}.tmp-*'))


@pytest.mark.parametrize('overrides, message', [
    ({'prune.sparsity': 1.0}, r'prune.sparsity=1.0 is invalid'),
    ({'prune.sparsity': -0.1}, r'prune.sparsity=-0.1 is invalid'),
    ({'quant.bits': 1}, r'bits must be an integer in 2..8, got 1'),
    ({'quant.bits': 9}, r'bits must be an integer in 2..8, got 9'),
    ({'quant.include': ('no_such_layer/kernel$',)}, r"'no_such_layer/kernel\$' matches no"),
    ({'prune.include': ('no_such_layer/kernel$',)}, r"'no_such_layer/kernel\$' matches no"),
])
def test_bad_config_is_one_clear_error_and_writes_nothing(run, tmp_path, overrides, message):
  out = tmp_path / 'out'
  with pytest.raises(ValueError, match=message):
    compress_checkpoint(run, compress_config('prune50_int4', **overrides), out)
  assert_nothing_written(out)


def _without_state_item(bad):
  step_dir = checkpoint.params_step_dir(bad)
  shutil.rmtree(step_dir / 'state')


def _only_a_temporary_step(bad):
  step_dir = checkpoint.params_step_dir(bad)
  step_dir.rename(step_dir.parent / f'{step_dir.name}.orbax-checkpoint-tmp-1234567890')


@pytest.mark.parametrize('breakage, message', [
    (_without_state_item, r'is not a complete checkpoint: no state item'),
    (_only_a_temporary_step, r'has no complete checkpoint'),
])
def test_half_written_checkpoint_is_one_clear_error(run, tmp_path, breakage, message):
  bad = tmp_path / 'bad_run'
  shutil.copytree(run, bad)
  breakage(bad)
  out = tmp_path / 'out'
  with pytest.raises(checkpoint.CheckpointError, match=message):
    compress_checkpoint(bad, compress_config('int8'), out)
  assert_nothing_written(out)


def test_missing_checkpoint_is_one_clear_error(tmp_path):
  missing, out = tmp_path / 'no_such_run', tmp_path / 'out'
  with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(missing))):
    compress_checkpoint(missing, compress_config('int8'), out)
  assert_nothing_written(out)
  with pytest.raises(checkpoint.CheckpointError, match=re.escape(f'{missing} does not exist')):
    evaluate_checkpoint(missing)


def test_existing_output_is_refused_and_left_untouched(run, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'mine.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='already exists'):
    compress_checkpoint(run, compress_config('int8'), out)
  assert [p.name for p in out.iterdir()] == ['mine.txt']
  assert (out / 'mine.txt').read_text() == 'keep me'
  assert not list(tmp_path.glob('.out.tmp-*'))


def test_relative_paths_work_like_absolute_ones(run, dense_eval, tmp_path, monkeypatch):
  # Orbax reads no metadata under a relative path; users type relative paths.
  shutil.copytree(run, tmp_path / 'run')
  monkeypatch.chdir(tmp_path)
  relative = evaluate_checkpoint('run')
  assert relative['eval_loss'] == dense_eval['eval_loss']
  summary = compress_checkpoint('run', compress_config('int8'), 'int8_out')
  assert summary['out'] == str(tmp_path / 'int8_out')
  assert evaluate_checkpoint('int8_out')['stored_bytes'] == summary['compressed_bytes']


# ------------------------------------------------------------------------------------ CLI


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TRAINBIG_DATA_DIR=os.environ['TRAINBIG_DATA_DIR'])
  return subprocess.run([sys.executable, '-m', 'trainbig_jax.cli', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_json_object(stdout):
  lines = [l for l in stdout.splitlines() if l.strip()]
  assert len(lines) == 1, stdout
  return json.loads(lines[0])


def test_cli_compress_and_eval_print_one_json_object(run, dense_eval, tmp_path):
  out = tmp_path / 'cli_out'
  result = _cli('compress', f'--checkpoint={run}', '--config=configs/compress.py:prune50_int4',
                f'--out={out}', '--json')
  assert result.returncode == 0, result.stderr
  summary = _one_json_object(result.stdout)
  assert COMPRESS_KEYS <= set(summary)
  assert summary['out'] == str(out.absolute())
  assert summary['selected_nonzero_params'] == summary['selected_params'] // 2

  result = _cli('eval', f'--checkpoint={out}', '--json')
  assert result.returncode == 0, result.stderr
  evaluated = _one_json_object(result.stdout)
  assert EVAL_KEYS <= set(evaluated)
  assert evaluated['stored_bytes'] == summary['compressed_bytes'] < dense_eval['stored_bytes']
  assert evaluated['nonzero_params'] == summary['nonzero_params']
  # The same compiled eval as in this process, on the same batches.
  np.testing.assert_allclose(evaluated['eval_loss'], evaluate_checkpoint(out)['eval_loss'],
                             rtol=1e-6)


def test_cli_bad_input_is_one_line_exit_2(run, tmp_path):
  out = tmp_path / 'cli_bad'
  result = _cli('compress', f'--checkpoint={run}', '--config=configs/compress.py:int8',
                '--config.quant.bits=9', f'--out={out}', '--json')
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.startswith('trainbig: error')]
  assert len(lines) == 1 and 'bits must be an integer in 2..8, got 9' in lines[0], result.stderr
  assert 'Traceback' not in result.stderr
  assert result.stdout.strip() == ''
  assert_nothing_written(out)

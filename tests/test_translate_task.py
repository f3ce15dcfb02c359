"""The translation task end to end on the embedded corpus: train, eval (BLEU), compress,
eval of compressed checkpoints, translate a file, config errors."""

import numpy as np
import pytest

from trainbig_jax.compress.checkpoints import compress_checkpoint, load_checkpoint_params
from trainbig_jax.configs import compress as compress_configs
from trainbig_jax.configs import translate as translate_configs
from trainbig_jax.evaluate import evaluate_checkpoint
from trainbig_jax.tasks import task_of
from trainbig_jax.tasks import translate as translate_task
from trainbig_jax.train.metrics import read_metrics
from trainbig_jax.translator import translate_file


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('translate')
  config = translate_configs.get_config('tiny')
  summary = task_of(config).train(config, workdir)
  assert summary.step == config.train.total_steps
  assert {'eval_loss', 'eval_bleu', 'eval_chrf'} <= set(summary.metrics)
  return workdir


def test_metrics_carry_bleu_and_loss_falls(run):
  evals = [r for r in read_metrics(run) if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [0, 10, 20]
  assert all(0.0 <= r['eval_bleu'] <= 100.0 and 0.0 <= r['eval_chrf'] <= 100.0 for r in evals)
  assert evals[-1]['eval_loss'] < evals[0]['eval_loss'] - 0.5


def test_eval_and_compress_a_translation_run(run, tmp_path):
  dense = evaluate_checkpoint(run)
  assert dense['task_kind'] == 'translate' and dense['primary_metric'] == 'eval_bleu'
  assert {'eval_loss', 'eval_bleu', 'eval_chrf'} <= set(dense)
  assert dense['eval_examples'] == 1776  # the whole validation split
  with pytest.raises(ValueError, match=r"--int8 evaluates the summed metrics \(eval_loss, "
                                      r"eval_accuracy\); .* is a 'translate' run, whose "
                                      r'eval_bleu needs the float path'):
    evaluate_checkpoint(run, int8=True)
  original, _ = load_checkpoint_params(run)

  def kernel(params, stack, part):
    return np.asarray(params[stack]['layers_0'][part]['wi' if part == 'mlp' else 'query']
                      ['kernel'])

  for preset in ('int8', 'prune50_int4'):
    out = tmp_path / preset
    compress_checkpoint(run, compress_configs.get_config(preset), out)
    params, _ = load_checkpoint_params(out)
    # Encoder and decoder kernels (cross-attention included) are selected by default.
    for stack, part in (('encoder', 'attention'), ('decoder', 'cross_attention'),
                        ('decoder', 'mlp')):
      dense_kernel, new = kernel(original, stack, part), kernel(params, stack, part)
      if preset == 'prune50_int4':
        assert 0.45 <= np.mean(new == 0) <= 0.55, (stack, part)
      else:
        assert not np.array_equal(new, dense_kernel), (stack, part)
        np.testing.assert_allclose(new, dense_kernel, atol=np.abs(dense_kernel).max() / 100)
    compressed = evaluate_checkpoint(out)
    assert {'eval_loss', 'eval_bleu', 'eval_chrf'} <= set(compressed)
    assert compressed['eval_loss'] < dense['eval_loss'] + 1.0


def test_translate_file_keeps_lines(run, tmp_path):
  source = tmp_path / 'in.txt'
  source.write_text('Choose Format - Character.\n\nClick OK.\n', encoding='utf-8')
  out = tmp_path / 'out.txt'
  assert translate_file(run, str(source), str(out)) == 3
  lines = out.read_text(encoding='utf-8').split('\n')
  assert len(lines) == 4 and lines[1] == '' and lines[3] == ''
  with pytest.raises(FileNotFoundError, match='--input='):
    translate_file(run, str(tmp_path / 'missing.txt'))


@pytest.mark.parametrize('field,value,message', [
    ('decode.beam_size', 0, 'decode.beam_size=0 is invalid'),
    ('decode.length_penalty', 'wu', "decode.length_penalty='wu' is invalid"),
    ('data.max_source_len', 40, 'data.max_source_len=40 exceeds model.max_len=32'),
    ('model.positions', 'rotary', "model.positions='rotary' is invalid"),
    ('model.label_smoothing', 1.0, 'model.label_smoothing=1.0 is invalid'),
])
def test_bad_config_is_one_clear_error(tmp_path, field, value, message):
  config = translate_configs.get_config('tiny')
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    translate_task.train(config, tmp_path)
  assert not (tmp_path / 'checkpoints').exists()


def test_presets_build():
  for preset in translate_configs.PRESETS:
    config = translate_configs.get_config(preset)
    translate_task.check_model_config(config.model)
    assert config.model.num_encoder_layers == config.model.num_decoder_layers
  with pytest.raises(ValueError, match="Unknown translate preset 'nope'"):
    translate_configs.get_config('nope')

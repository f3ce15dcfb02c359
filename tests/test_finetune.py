"""Fine-tuning a pretrained encoder for classification, plain and compression-aware."""

import json
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from trainbig_jax.compress import prune
from trainbig_jax.compress.checkpoints import compress_checkpoint
from trainbig_jax.configs import compress as compress_configs
from trainbig_jax.configs import finetune as finetune_configs
from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.data import classification
from trainbig_jax.data.tokenizer import train_or_load_tokenizer
from trainbig_jax.evaluate import evaluate_checkpoint
from trainbig_jax.tasks.classify import finetune, pruning_steps
from trainbig_jax.tasks.mlm import pretrain
from trainbig_jax.train import checkpoint
from trainbig_jax.train.metrics import read_metrics

LAYER_KERNEL = re.compile(r'layers_\d+/.*/kernel$')


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A tiny pretrained run: 2 layers x 64 wide, 2 heads, a 2000-piece vocabulary.

  Kept short on purpose: a tiny MLM model trained for hundreds of steps settles on unigram
  predictions, and its representations then make a poor start for classification (fine-
  tuning stays at the majority class for 600+ steps); 20 steps leave a usable encoder. The
  larger vocabulary keeps more whole words as tokens, which helps the sentiment task.
  """
  workdir = tmp_path_factory.mktemp('pretrained')
  c = pretrain_configs.get_config('tiny')
  c.model.hidden, c.model.mlp_dim = 64, 256
  c.data.vocab_size = 2000
  pretrain(c, workdir)
  return workdir


@pytest.fixture(scope='module', autouse=True)
def reuse_compiled_programs(compilation_cache):
  """The evaluations of same-shaped classifiers run one program: compiled once."""
  with compilation_cache():
    yield


def demo(**overrides):
  """The 'demo' fine-tuning preset, shortened for tests; overrides as 'section.name': value."""
  c = finetune_configs.get_config('demo')
  c.max_len = 32
  c.train.batch_size = 32
  c.train.budget_s = 0.0
  c.model.dropout = c.model.attention_dropout = 0.0
  for field, value in overrides.items():
    node = c
    *parents, name = field.split('.')
    for parent in parents:
      node = node[parent]
    node[name] = value
  return c


def evals(workdir):
  return {r['step']: r for r in read_metrics(workdir) if 'eval_accuracy' in r}


def best_step(workdir):
  return int(checkpoint.params_step_dir(workdir).name)


def best_metrics(workdir):
  step_dir = checkpoint.params_step_dir(workdir)
  assert step_dir.parent.name == checkpoint.BEST_DIR
  return json.loads((step_dir / 'metrics' / 'metrics').read_text())


def layer_kernels(params):
  return {p: np.asarray(x) for p, x in prune.flatten_with_paths(params)[0]
          if LAYER_KERNEL.search(p)}


@pytest.fixture(scope='module')
def finetuned(pretrained, tmp_path_factory):
  """(workdir, summary) of a run past the majority-class plateau, shared by the tests that
  need a trained classifier."""
  workdir = tmp_path_factory.mktemp('finetuned')
  c = demo(**{'train.total_steps': 300, 'train.eval_every': 100, 'train.learning_rate': 1e-3})
  return workdir, finetune(c, pretrained, workdir)


def test_finetuning_beats_the_majority_class(finetuned):
  # Measured: 0.66-0.68 validation accuracy at step 300 (majority 0.578); the model leaves
  # the majority-class plateau around step 150-200.
  tmp_path, summary = finetuned
  majority = classification.majority_class_accuracy('rotten_tomatoes', 'validation')
  history = evals(tmp_path)
  print(f'majority {majority:.4f}; accuracy by step '
        f'{ {s: round(r["eval_accuracy"], 4) for s, r in history.items()} }')
  assert summary.step == 300 and summary.stopped_by == 'steps'
  assert summary.eval_accuracy > majority + 0.03
  assert sorted(history) == [0, 100, 200, 300]
  # The best evaluation is kept, and downstream commands read it.
  best = max(history.values(), key=lambda r: r['eval_accuracy'])
  assert best_metrics(tmp_path)['eval_accuracy'] == best['eval_accuracy']
  assert json.loads((tmp_path / checkpoint.CONFIG_FILE).read_text())['model']['hidden'] == 64


def test_int8_eval_matches_the_dequantized_accuracy(finetuned, tmp_path):
  workdir, _ = finetuned
  out = tmp_path / 'int8'
  compress_checkpoint(workdir, compress_configs.get_config('int8'), out)
  dequantized = evaluate_checkpoint(out)
  integer = evaluate_checkpoint(out, int8=True)
  print(f"int8 checkpoint: dequantized accuracy {dequantized['eval_accuracy']:.4f} loss "
        f"{dequantized['eval_loss']:.5f}; int8 matmuls {integer['eval_accuracy']:.4f} loss "
        f"{integer['eval_loss']:.5f}")
  assert (dequantized['matmuls'], integer['matmuls']) == ('float', 'int8')
  # A classifier, not the majority class, so a broken int8 path would show.
  majority = classification.majority_class_accuracy('rotten_tomatoes', 'validation')
  assert dequantized['eval_accuracy'] > majority + 0.03
  assert abs(integer['eval_accuracy'] - dequantized['eval_accuracy']) <= 0.005
  # The activations really are quantized: the loss moves, a little.
  assert integer['eval_loss'] != dequantized['eval_loss']
  np.testing.assert_allclose(integer['eval_loss'], dequantized['eval_loss'], rtol=0.02)


def test_pruned_finetuning_ends_at_exact_sparsity(pretrained, tmp_path):
  c = demo(**{'train.total_steps': 40, 'train.eval_every': 20,
              'compression.prune.final_sparsity': 0.5})
  finetune(c, pretrained, tmp_path)
  _, ramp_end = pruning_steps(c)
  assert ramp_end == 24  # end_frac 0.6 of 40 steps: the step-20 eval is not kept
  assert best_step(tmp_path) >= ramp_end
  assert sorted(evals(tmp_path)) == [0, 20, 40]
  kernels = layer_kernels(checkpoint.restore_params(tmp_path))
  assert len(kernels) == 12  # 2 layers x (query, key, value, out, wi, wo)
  for path, kernel in kernels.items():
    assert np.count_nonzero(kernel) == kernel.size // 2, path
  # The optimizer's masks (in the last checkpoint) are exactly where the weights are zero.
  state_dir = tmp_path / checkpoint.CHECKPOINT_DIR / '40' / 'state'
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(state_dir).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                            is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))
    state = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  masks = _find(state['opt_state'], 'masks')
  for path, kernel in kernels.items():
    mask = np.asarray(_get(masks, path), bool)
    assert mask.sum() == kernel.size // 2, path
    # The best checkpoint is after the ramp, so its zeros are the final masks' zeros.
    assert np.all(kernel[~mask] == 0) and np.all(kernel[mask] != 0), path


def _find(tree, key):
  if isinstance(tree, dict):
    if key in tree:
      return tree[key]
    children = tree.values()
  elif isinstance(tree, (list, tuple)):
    children = tree
  else:
    return None
  for child in children:
    found = _find(child, key)
    if found is not None:
      return found
  return None


def _get(tree, path):
  for name in path.split('/'):
    tree = tree[name]
  return tree


def test_qat_accuracy_is_the_accuracy_of_the_quantized_checkpoint(pretrained, tmp_path):
  workdir = tmp_path / 'qat'
  c = demo(**{'train.total_steps': 60, 'train.eval_every': 30, 'train.learning_rate': 2e-3,
              'compression.qat.bits': 4})
  finetune(c, pretrained, workdir)
  reported = best_metrics(workdir)
  assert reported['step'] == best_step(workdir)
  assert reported['eval_accuracy'] == evals(workdir)[reported['step']]['eval_accuracy']
  # The same quantizer as QAT: per-channel symmetric 4-bit on the same kernels.
  q = compress_configs.get_config('int4').quant
  assert (q.bits, q.symmetric, q.granularity) == (4, True, 'per_channel')
  assert tuple(q.include) == tuple(c.compression.qat.include)
  out = tmp_path / 'int4'
  compress_checkpoint(workdir, compress_configs.get_config('int4'), out)
  quantized = evaluate_checkpoint(out)
  dense = evaluate_checkpoint(workdir)  # the float weights QAT trained, unquantized
  num_examples = quantized['eval_examples']
  print(f"QAT run at step {reported['step']}: reported accuracy {reported['eval_accuracy']:.4f} "
        f"loss {reported['eval_loss']:.6f}; int4 checkpoint {quantized['eval_accuracy']:.4f} "
        f"loss {quantized['eval_loss']:.6f}; float weights {dense['eval_accuracy']:.4f} "
        f"loss {dense['eval_loss']:.6f}; {num_examples} examples")
  assert num_examples == 1275
  assert abs(quantized['eval_accuracy'] - reported['eval_accuracy']) <= 1 / num_examples
  # Measured: exactly equal, loss included (fake_quant and storage share _quantize_arrays).
  assert quantized['eval_accuracy'] == reported['eval_accuracy']
  np.testing.assert_allclose(quantized['eval_loss'], reported['eval_loss'], rtol=1e-6)
  assert dense['eval_loss'] != quantized['eval_loss']  # the quantization does change the model


def test_run_folder_from_before_task_kind_still_evaluates(pretrained, tmp_path):
  # Fine-tuning folders written before config.json recorded `task_kind` name only their
  # dataset in `task`; `trainbig eval` must still find the classification task.
  finetune(demo(**{'train.total_steps': 2, 'train.eval_every': 2}), pretrained, tmp_path)
  config_path = tmp_path / checkpoint.CONFIG_FILE
  config = json.loads(config_path.read_text())
  assert config['task_kind'] == 'classify'
  del config['task_kind']
  config_path.write_text(json.dumps(config))
  result = evaluate_checkpoint(tmp_path)
  logged = evals(tmp_path)[best_step(tmp_path)]
  assert (result['task_kind'], result['task']) == ('classify', 'rotten_tomatoes')
  assert (result['primary_metric'], result['primary_mode']) == ('eval_accuracy', 'max')
  assert result['eval_accuracy'] == logged['eval_accuracy']
  np.testing.assert_allclose(result['eval_loss'], logged['eval_loss'], rtol=1e-6)


# ------------------------------------------------------------------------------ bad input


def test_missing_init_checkpoint_is_one_clear_error(tmp_path):
  workdir = tmp_path / 'ft'
  missing = tmp_path / 'no_such_run'
  with pytest.raises(checkpoint.CheckpointError,
                     match=re.escape(f'--init_checkpoint={missing} does not exist')):
    finetune(demo(), missing, workdir)
  assert not workdir.exists()


def _wider_config(run):
  path = run / checkpoint.CONFIG_FILE
  config = json.loads(path.read_text())
  config['model']['hidden'], config['model']['mlp_dim'] = 128, 512
  path.write_text(json.dumps(config))


def _other_vocabulary(run):
  # A tokenizer of another run with another vocabulary size.
  c = pretrain_configs.get_config('tiny')
  c.data.vocab_size = 600
  other = run.parent / 'other_tokenizer'
  other.mkdir()
  tokenizer = train_or_load_tokenizer(c.data, str(other))
  tokenizer.copy_to(str(other))
  assert tokenizer.vocab_size == 600
  shutil.copyfile(other / checkpoint.TOKENIZER_FILE, run / checkpoint.TOKENIZER_FILE)


@pytest.mark.parametrize('breakage, message', [
    (_wider_config, r'is incompatible: .* has shape \(64,\) but this model needs \(128,\)'),
    (_other_vocabulary, r'is incompatible: embed/token/embedding has shape \(2000, 64\) but '
                        r'this model needs \(600, 64\)'),
])
def test_incompatible_init_checkpoint_is_one_clear_error(pretrained, tmp_path, breakage,
                                                         message):
  bad = tmp_path / 'bad_run'
  shutil.copytree(pretrained, bad)
  breakage(bad)
  workdir = tmp_path / 'ft'
  with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(bad)) + '.*' + message):
    finetune(demo(), bad, workdir)
  assert not workdir.exists()  # nothing written: checked before the run folder is made


def test_unknown_task_is_one_clear_error(pretrained, tmp_path):
  workdir = tmp_path / 'ft'
  with pytest.raises(ValueError, match=r"Unknown classification task 'no_such_task'; allowed: "
                                       r'mnli, rotten_tomatoes, sst2'):
    finetune(demo(task='no_such_task'), pretrained, workdir)
  assert not workdir.exists()

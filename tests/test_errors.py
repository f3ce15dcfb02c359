"""Every bad input of tests/error_cases.py: one line naming the problem, nothing partial written."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from damage import truncate_array_files
from error_cases import CASES, DOC, Case, markdown
from trainbig_jax.compress.checkpoints import compress_checkpoint
from trainbig_jax.configs import compress as compress_configs
from trainbig_jax.configs import finetune as finetune_configs
from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.configs import sweep as sweep_configs
from trainbig_jax.data.tokenizer import train_tokenizer
from trainbig_jax.evaluate import evaluate_checkpoint
from trainbig_jax.experiments.sweep import run_sweep
from trainbig_jax.train import runlock
from trainbig_jax.tasks.classify import finetune
from trainbig_jax.tasks.mlm import pretrain
from trainbig_jax.translator import Translator

ROOT = Path(__file__).resolve().parents[1]


def _tree(*roots: Path) -> dict[str, str]:
  """The content hash of every file under `roots` ('dir' for folders); the (empty) writer
  lock file is left out."""
  files = {}
  for root in roots:
    for path in sorted(root.rglob('*')):
      if path.is_file() and path.name != runlock.LOCK_FILE:
        files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
      elif path.is_dir():
        files[str(path)] = 'dir'
  return files


def _set(config, field: str, value) -> None:
  *sections, name = field.split('.')
  for section in sections:
    config = config[section]
  config[name] = value


@pytest.fixture(scope='module')
def compressed(tiny_run, tmp_path_factory):
  out = tmp_path_factory.mktemp('compressed') / 'int8'
  compress_checkpoint(tiny_run, compress_configs.get_config('int8'), out)
  return out


# ------------------------------------------------------------------ targets: damaged folders


def _copy(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst)
  return dst


def _truncate_newest_step(run: Path) -> None:
  step = max((p for p in (run / 'checkpoints').iterdir() if p.name.isdigit()),
             key=lambda p: int(p.name))
  truncate_array_files(step)


def _other_tokenizer(tmp: Path) -> Path:
  """A valid tokenizer of 300 pieces (the tiny runs have 512), trained on this repo's README."""
  lines = [l for l in (ROOT / 'README.md').read_text().splitlines() if l.strip()]
  path = tmp / 'other_tokenizer' / 'tokenizer.model'
  train_tokenizer(iter(lines), 300, path, num_threads=1)
  return path


def _files_config(tiny, tmp: Path, pattern: str):
  tiny.data.dataset = f'files:{tmp / "corpus" / pattern}'
  tiny.data.data_dir = str(tmp / 'data')  # inside tmp: the test sees anything left there
  (tmp / 'corpus').mkdir()
  return tiny


def _tamper_payload(out: Path) -> None:
  import numpy as np
  import orbax.checkpoint as ocp
  arrays_dir = out / 'compressed' / 'arrays'
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    arrays = ckptr.restore(arrays_dir)
  kernel = arrays['layers_0']['attention']['query']['kernel']
  kernel['values'] = np.asarray(kernel['values']).copy()
  kernel['values'].flat[0] ^= 1
  shutil.rmtree(arrays_dir)
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    ckptr.save(arrays_dir, args=ocp.args.StandardSave(arrays))


def _edit_json(path: Path, edit) -> None:
  data = json.loads(path.read_text())
  edit(data)
  path.write_text(json.dumps(data))


def _target(name: str, run: Path, compressed: Path, tmp: Path):
  """Prepares the folder of a 'target' case under `tmp`; returns the failing call."""
  tiny = pretrain_configs.get_config('tiny')
  tiny.train.update(dict(total_steps=8, checkpoint_every=4, eval_every=4, log_every=1,
                         keep_checkpoints=5))
  (tmp / 'empty').mkdir()
  if name == 'resume_other_model':
    tiny.model.hidden = 64
    target = _copy(run, tmp / 'run')
    return lambda: pretrain(tiny, target)
  if name == 'resume_other_vocab':
    tiny.data.vocab_size = 1000
    target = _copy(run, tmp / 'run')
    return lambda: pretrain(tiny, target)
  if name == 'eval_garbage_tokenizer':
    target = _copy(run, tmp / 'run')
    (target / 'tokenizer.model').write_bytes(b'not a model')
    return lambda: evaluate_checkpoint(target)
  if name == 'files_no_match':
    _files_config(tiny, tmp, 'nothing*.txt')
    return lambda: pretrain(tiny, tmp / 'run')
  if name == 'files_not_utf8':
    _files_config(tiny, tmp, '*.txt')
    (tmp / 'corpus' / 'bad.txt').write_bytes(
        'First line.\nSecond line.\nCaf\u00e9 au lait.\n'.encode('latin-1'))
    return lambda: pretrain(tiny, tmp / 'run')
  if name == 'files_empty':
    _files_config(tiny, tmp, '*.txt')
    (tmp / 'corpus' / 'empty.txt').write_text('')
    return lambda: pretrain(tiny, tmp / 'run')
  if name == 'pretrain_other_tokenizer':
    tiny.data.tokenizer_path = str(_other_tokenizer(tmp))
    return lambda: pretrain(tiny, tmp / 'run')
  if name in ('eval_other_tokenizer', 'finetune_other_tokenizer'):
    target = _copy(run, tmp / 'run')
    shutil.copyfile(_other_tokenizer(tmp), target / 'tokenizer.model')
    if name == 'eval_other_tokenizer':
      return lambda: evaluate_checkpoint(target)
    ft = finetune_configs.get_config('demo')
    ft.max_len = 32
    return lambda: finetune(ft, target, tmp / 'ft')
  if name == 'translate_mlm_run':
    return lambda: Translator(run)
  compress_cfg = compress_configs.get_config('int8')
  if name == 'compress_out_exists':
    (tmp / 'out').mkdir()
    return lambda: compress_checkpoint(run, compress_cfg, tmp / 'out')
  if name == 'compress_missing':
    return lambda: compress_checkpoint(tmp / 'nope', compress_cfg, tmp / 'out')
  if name == 'compress_empty_folder':
    return lambda: compress_checkpoint(tmp / 'empty', compress_cfg, tmp / 'out')
  if name in ('compress_damaged', 'eval_damaged', 'finetune_damaged'):
    target = _copy(run, tmp / 'run')
    _truncate_newest_step(target)
    return {'compress_damaged': lambda: compress_checkpoint(target, compress_cfg, tmp / 'out'),
            'eval_damaged': lambda: evaluate_checkpoint(target),
            'finetune_damaged': lambda: finetune(finetune_configs.get_config('demo'), target,
                                                 tmp / 'ft')}[name]
  if name == 'eval_empty_folder':
    return lambda: evaluate_checkpoint(tmp / 'empty')
  if name == 'eval_garbled_config':
    target = _copy(run, tmp / 'run')
    (target / 'config.json').write_text('{"model": ')
    return lambda: evaluate_checkpoint(target)
  if name == 'eval_no_checkpoint':
    target = _copy(run, tmp / 'run')
    shutil.rmtree(target / 'checkpoints')
    return lambda: evaluate_checkpoint(target)
  if name == 'eval_tampered_compressed':
    target = _copy(compressed, tmp / 'int8')
    _tamper_payload(target)
    return lambda: evaluate_checkpoint(target)
  if name == 'eval_garbled_manifest':
    target = _copy(compressed, tmp / 'int8')
    (target / 'compressed' / 'manifest.json').write_text('{"format": ')
    return lambda: evaluate_checkpoint(target)
  if name == 'eval_other_format':
    target = _copy(compressed, tmp / 'int8')
    _edit_json(target / 'compressed' / 'manifest.json', lambda m: m.update(format='other'))
    return lambda: evaluate_checkpoint(target)
  if name == 'finetune_edited_config':
    target = _copy(run, tmp / 'run')
    _edit_json(target / 'config.json', lambda c: c['model'].update(hidden=64, mlp_dim=256))
    ft = finetune_configs.get_config('demo')
    ft.max_len = 32
    return lambda: finetune(ft, target, tmp / 'ft')
  ft = finetune_configs.get_config('demo')
  if name == 'finetune_missing':
    return lambda: finetune(ft, tmp / 'nope', tmp / 'ft')
  if name == 'finetune_empty_folder':
    return lambda: finetune(ft, tmp / 'empty', tmp / 'ft')
  if name == 'finetune_compressed':
    return lambda: finetune(ft, compressed, tmp / 'ft')
  if name == 'finetune_no_tokenizer':
    target = _copy(run, tmp / 'run')
    (target / 'tokenizer.model').unlink()
    return lambda: finetune(ft, target, tmp / 'ft')
  if name == 'sweep_changed':
    sweep_dir = tmp / 'sweep'
    sweep_dir.mkdir()
    (sweep_dir / 'sweep.json').write_text(sweep_configs.get_config('tiny').to_json())
    return lambda: run_sweep(sweep_configs.get_config('demo'), sweep_dir,
                             progress=lambda _: None)
  if name == 'busy_folder':
    target = _copy(run, tmp / 'run')
    code = ('import sys, time\nfrom trainbig_jax.train import runlock\n'
            'with runlock.hold(sys.argv[1]):\n  print("held", flush=True)\n  time.sleep(600)\n')
    holder = subprocess.Popen([sys.executable, '-c', code, str(target)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert holder.stdout.readline().strip() == 'held'

    def call():
      try:
        pretrain(tiny, target)
      finally:
        holder.kill()
        holder.wait()
    return call
  raise KeyError(name)


# ------------------------------------------------------------------ running a case


def _first_line(e: BaseException) -> str:
  text = str(e).strip()  # what cli._main prints after 'trainbig: error: '
  return text.splitlines()[0] if text else type(e).__name__


def _read_only_folders(run: Path, readonly: Path, readonly_parent: Path,
                       unprivileged: list[str] | None) -> list[str]:
  """A copy of `run` and an empty folder, every folder of both without write permission;
  returns the prefix that makes the command subject to permission bits."""
  if unprivileged is None:
    pytest.skip('running as root without setpriv: permission bits cannot stop a write')
  _copy(run, readonly)
  readonly_parent.mkdir()
  for root in (readonly, readonly_parent):
    for folder in [root, *(p for p in root.rglob('*') if p.is_dir())]:
      folder.chmod(0o555)
  return unprivileged


def _run_cli(argv: list[str], prefix: list[str] = ()) -> tuple[int, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  result = subprocess.run([*prefix, sys.executable, '-m', 'trainbig_jax.cli', *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  return result.returncode, result.stderr


def _failure(case: Case, run: Path, compressed: Path, tmp: Path,
             unprivileged: list[str] | None = None) -> str:
  """Runs the case; returns the one line the user gets."""
  if case.kind == 'cli':
    (tmp / 'config.yaml').write_text('model:\n  hidden: [32\n')
    (tmp / 'binary.py').write_bytes(b'\xff\xfe config')
    (tmp / 'noget.py').write_text('x = 1\n')
    # Read-only folders live beside `tmp`, whose content the test checks.
    readonly, readonly_parent = tmp.parent / 'readonly', tmp.parent / 'readonly_parent'
    argv = [a.format(run=run, tmp=tmp, file=tmp / 'config.yaml', compressed=compressed,
                     readonly=readonly, readonly_parent=readonly_parent) for a in case.args]
    prefix = []
    if any('{readonly' in a for a in case.args):
      prefix = _read_only_folders(run, readonly, readonly_parent, unprivileged)
    code, stderr = _run_cli(argv, prefix)
    lines = [l for l in stderr.splitlines() if l.startswith('trainbig: error: ')]
    assert code == 2 and len(lines) == 1, stderr
    assert 'Traceback' not in stderr, stderr
    return lines[0][len('trainbig: error: '):]
  if case.kind == 'target':
    call = _target(case.args[0], run, compressed, tmp)
  else:
    if case.kind == 'pretrain':
      config = pretrain_configs.get_config('tiny')
      call = lambda: pretrain(config, tmp / 'run')
    elif case.kind == 'finetune':
      config = finetune_configs.get_config('demo')
      call = lambda: finetune(config, run, tmp / 'ft')
    elif case.kind == 'compress':
      config = compress_configs.get_config('dense')
      call = lambda: compress_checkpoint(run, config, tmp / 'out')
    else:
      config = sweep_configs.get_config('tiny')
      call = lambda: run_sweep(config, tmp / 'sweep', progress=lambda _: None)
    for field, value in case.args:
      _set(config, field, value)
  with pytest.raises((ValueError, OSError, KeyError)) as e:  # what the CLI shows in one line
    call()
  return _first_line(e.value)


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_run, compressed, tmp_path,
                                                  monkeypatch, unprivileged):
  monkeypatch.chdir(ROOT)
  tmp = tmp_path / 'case'
  tmp.mkdir()
  shared = _tree(tiny_run, compressed)
  # The case's own inputs are made by _failure; snapshot them right before the failing call.
  snapshots = {}
  real_target = _target

  def snapshot_after_setup(*args):
    call = real_target(*args)
    snapshots['tmp'] = _tree(tmp)
    return call

  monkeypatch.setattr(sys.modules[__name__], '_target', snapshot_after_setup)
  if case.kind != 'target':
    snapshots['tmp'] = _tree(tmp) if case.kind != 'cli' else None
  message = _failure(case, tiny_run, compressed, tmp, unprivileged)
  assert case.message in message, message
  assert _tree(tiny_run, compressed) == shared
  if (tmp_path / 'readonly').exists():  # the refused read-only run: every byte kept
    relative = lambda root: {k[len(str(root)):]: v for k, v in _tree(root).items()}
    assert relative(tmp_path / 'readonly') == relative(tiny_run)
    assert not any((tmp_path / 'readonly_parent').iterdir())
  if snapshots.get('tmp') is not None:
    assert _tree(tmp) == snapshots['tmp'], 'the failed command wrote or changed files'
  else:  # cli: only the three input files made for it
    assert sorted(p.name for p in tmp.iterdir()) == ['binary.py', 'config.yaml', 'noget.py']


def test_the_table_has_forty_rows_and_the_doc_is_current():
  assert len(CASES) >= 40
  assert len({c.name for c in CASES}) == len(CASES)
  assert DOC.read_text() == markdown(), 'run: python tests/error_cases.py'

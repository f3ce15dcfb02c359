"""Fault injection: SIGKILL trainbig commands at random moments, rerun, compare.

Each scenario runs a command once uninterrupted (the reference), then runs it again in a new
folder, killing it with SIGKILL at `--kills` moments and rerunning the same command after
every kill, and finally compares the outcome with the reference:

  train     pretraining (tiny model). Kill moments: random (during start-up or training),
            inside a checkpoint save (an Orbax temporary folder exists) and inside an
            evaluation (the train line of an evaluation step is logged, its eval line is
            not). Checks: the final state (step, parameters, optimizer state) and data
            position bit-identical to the reference; metrics.jsonl holds every step once
            with the reference's losses; after every kill, the newest checkpoint that looks
            complete restores.
  finetune  the same for `trainbig finetune` from the reference pretraining run.
  compress  random moments; after each kill the output folder is absent or complete, and
            the finished one holds the reference's payload (same checksums).
  sweep     a tiny sweep; results.jsonl never holds a half line or a duplicate cell, and ends
            with the reference's cells and numbers.

  python benchmarks/faults.py --kills=20                      # pretraining, 20 kills
  python benchmarks/faults.py --scenario=sweep --kills=5
  python benchmarks/faults.py --scenario=train,finetune,compress --kills=2 --short

Prints one table per scenario (a row per kill) and a summary; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ('train', 'finetune', 'compress', 'sweep')
POLL_S = 0.01


@dataclasses.dataclass
class Kill:
  aim: str  # the moment aimed at: 'random', 'save', 'eval'
  after_s: float  # seconds after the command started
  landed: str  # where it landed, as seen from the files: 'start-up', 'training', 'save', ...
  logged_step: int  # the last step in metrics.jsonl at the kill (-1: none)
  checkpoint: int  # the newest complete checkpoint at the kill (-1: none)
  resumed_from: int = -1  # the step the next run resumed from (-1: started afresh)


@dataclasses.dataclass
class Outcome:
  scenario: str
  kills: list[Kill]
  checks: dict[str, bool]
  reference_s: float
  faulty_s: float
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return all(self.checks.values())


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in
                                                     env.get('PYTHONPATH', '').split(os.pathsep)
                                                     if p])
  env.setdefault('JAX_PLATFORMS', 'cpu')
  return env


def _command(args: list[str]) -> list[str]:
  return [sys.executable, '-m', 'trainbig_jax.cli'] + args


def _start(args: list[str], log: Path) -> subprocess.Popen:
  out = open(log, 'ab')
  out.write(f'\n$ trainbig {" ".join(args)}\n'.encode())
  out.flush()
  return subprocess.Popen(_command(args), stdout=out, stderr=subprocess.STDOUT, env=_env(),
                          cwd=ROOT)


def _run_to_end(args: list[str], log: Path) -> float:
  start = time.perf_counter()
  proc = _start(args, log)
  if proc.wait() != 0:
    raise RuntimeError(f'trainbig {" ".join(args)} failed (exit {proc.returncode}); see {log}')
  return time.perf_counter() - start


# ------------------------------------------------------------------ reading a run folder


def _metrics(workdir: Path) -> list[dict[str, Any]]:
  """Complete lines of metrics.jsonl; a torn last line (the kill's) is skipped."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def _complete_steps(workdir: Path) -> list[int]:
  root = workdir / 'checkpoints'
  if not root.is_dir():
    return []
  # Orbax renames a step's temporary folder to its number when the step is complete.
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def _temporary_folders(workdir: Path) -> set[str]:
  try:
    return {p.name for p in (workdir / 'checkpoints').iterdir() if 'tmp' in p.name}
  except FileNotFoundError:
    return set()


def _saving(workdir: Path, leftover: set[str]) -> bool:
  """An Orbax save in progress: a temporary step folder exists (not one left by a kill)."""
  return bool(_temporary_folders(workdir) - leftover)


def _read_state(step_dir: Path) -> dict[str, Any]:
  """The 'state' item of a step folder as host numpy arrays (what any Orbax user reads)."""
  import jax
  import orbax.checkpoint as ocp
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # Orbax warns of the item-level metadata it lacks
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(step_dir / 'state').item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                        is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))
    return ckptr.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(restore_args=args))


def _same_bits(a: Any, b: Any) -> bool:
  import jax
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  return ta == tb and all(np.asarray(x).dtype == np.asarray(y).dtype
                          and np.asarray(x).tobytes() == np.asarray(y).tobytes()
                          for x, y in zip(la, lb))


def _resumed_from(log: Path) -> int:
  """The step the last run in `log` resumed from (-1: it started afresh)."""
  text = log.read_text(errors='replace').rsplit('\n$ trainbig', 1)[-1]
  marker = 'Resumed from step '
  if marker not in text:
    return -1
  return int(text.rsplit(marker, 1)[1].split()[0])


# ------------------------------------------------------------------ killing


def _wait_for(proc: subprocess.Popen, condition, timeout_s: float) -> bool:
  """Polls `condition` until it holds (True) or the process ends or time runs out (False)."""
  end = time.perf_counter() + timeout_s
  while time.perf_counter() < end:
    if proc.poll() is not None:
      return False
    if condition():
      return True
    time.sleep(POLL_S)
  return False


def _kill_training(args: list[str], workdir: Path, aim: str, eval_every: int,
                   rng: random.Random, log: Path) -> Kill | None:
  """Starts a train/finetune command and kills it at a moment of kind `aim`.

  Returns None when the command finished first.
  """
  start = time.perf_counter()
  before = len(_metrics(workdir))
  leftover = _temporary_folders(workdir)  # a killed save's folder, until Orbax removes it
  proc = _start(args, log)
  training = lambda: len(_metrics(workdir)) > before
  if aim == 'random' and rng.random() < 0.25:  # a moment of the start-up
    hit = not _wait_for(proc, lambda: False, rng.uniform(0.5, 6.0)) and proc.poll() is None
  elif aim == 'random':
    hit = (_wait_for(proc, training, 600) and
           not _wait_for(proc, lambda: False, rng.uniform(0.0, 1.5)) and proc.poll() is None)
  elif aim == 'save':
    hit = _wait_for(proc, lambda: _saving(workdir, leftover), 600)
  else:  # eval: the train line of an evaluation step is logged, its eval line not yet
    def evaluating():
      rows = _metrics(workdir)[before:]
      return bool(rows) and 'train_loss' in rows[-1] and rows[-1]['step'] % eval_every == 0
    hit = _wait_for(proc, evaluating, 600)
  if not hit:
    proc.wait()
    if proc.returncode != 0:
      raise RuntimeError(f'trainbig {" ".join(args)} failed (exit {proc.returncode}); see {log}')
    return None
  in_save = _saving(workdir, leftover)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  after = time.perf_counter() - start
  rows = _metrics(workdir)
  new_rows = rows[before:] if len(rows) >= before else rows
  if in_save:
    landed = 'save'
  elif aim == 'eval' and new_rows and 'train_loss' in new_rows[-1]:
    landed = 'eval'  # the eval line of that step never came
  elif not new_rows:
    landed = 'start-up'
  else:
    landed = 'training'
  steps = _complete_steps(workdir)
  return Kill(aim=aim, after_s=after, landed=landed,
              logged_step=rows[-1]['step'] if rows else -1,
              checkpoint=steps[-1] if steps else -1)


def _check_newest_restores(workdir: Path, notes: list[str]) -> bool:
  """The newest checkpoint that looks complete really is (its state reads)."""
  steps = _complete_steps(workdir)
  if not steps:
    return True
  try:
    _read_state(workdir / 'checkpoints' / str(steps[-1]))
    return True
  except Exception as e:  # pylint: disable=broad-except
    notes.append(f'checkpoint {steps[-1]} looked complete but did not restore: {e}'[:300])
    return False


def _training_scenario(name: str, args_for, workdir: Path, reference: Path, kills: int,
                       eval_every: int, rng: random.Random) -> Outcome:
  log = workdir.parent / f'{name}.log'
  ref_s = _run_to_end(args_for(reference), workdir.parent / f'{name}_reference.log')
  aims = ['random', 'save', 'eval']
  records, notes, restorable = [], [], True
  start = time.perf_counter()
  while len(records) < kills:
    kill = _kill_training(args_for(workdir), workdir, aims[len(records) % 3], eval_every, rng,
                          log)
    if kill is None:
      notes.append(f'the run finished after {len(records)} kills')
      break
    restorable &= _check_newest_restores(workdir, notes)
    if records:
      records[-1].resumed_from = _resumed_from(log)
    records.append(kill)
  _run_to_end(args_for(workdir), log)  # after the last kill (a no-op if that run had ended)
  if records:
    records[-1].resumed_from = _resumed_from(log)
  faulty_s = time.perf_counter() - start
  checks = _compare_runs(reference, workdir, notes)
  checks['newest complete-looking checkpoint restored after every kill'] = restorable
  checks[f'{kills} kills made'] = len(records) == kills
  fallbacks = log.read_text(errors='replace').count('does not restore')
  checks['no fallback past a damaged checkpoint was needed'] = fallbacks == 0
  return Outcome(name, records, checks, ref_s, faulty_s, notes)


def _compare_runs(reference: Path, faulty: Path, notes: list[str]) -> dict[str, bool]:
  ref_steps, steps = _complete_steps(reference), _complete_steps(faulty)
  checks = {'same final checkpoint step': bool(steps) and steps[-1] == ref_steps[-1]}
  if not checks['same final checkpoint step']:
    notes.append(f'final steps: reference {ref_steps}, faulty {steps}')
    return checks
  final = str(ref_steps[-1])
  checks['state (step, params, optimizer) bit-identical'] = _same_bits(
      _read_state(reference / 'checkpoints' / final), _read_state(faulty / 'checkpoints' / final))
  data = lambda run: (run / 'checkpoints' / final / 'data' / 'metadata').read_text()
  checks['data position identical'] = data(reference) == data(faulty)
  ref_rows, rows = _metrics(reference), _metrics(faulty)
  key = lambda r: (r['step'], 'train_loss' in r)
  checks['metrics.jsonl: every step once, in order'] = (
      [key(r) for r in rows] == [key(r) for r in ref_rows])
  losses = lambda rs: [(r['step'], r.get('train_loss'), r.get('eval_loss'), r.get('tokens'))
                       for r in rs]
  checks['metrics.jsonl: same losses and tokens as the reference'] = (
      losses(rows) == losses(ref_rows))
  lines = (faulty / 'metrics.jsonl').read_text().split('\n')
  checks['metrics.jsonl: no torn line'] = lines[-1] == '' and all(_is_json(l) for l in lines[:-1])
  return checks


def _is_json(line: str) -> bool:
  try:
    json.loads(line)
    return True
  except json.JSONDecodeError:
    return False


# ------------------------------------------------------------------ scenarios


def _pretrain_args(steps: int, tokenizer: Path | None = None):
  def args(workdir: Path) -> list[str]:
    a = ['train', '--config=configs/pretrain.py:tiny', f'--workdir={workdir}',
         f'--config.train.total_steps={steps}', '--config.train.log_every=1',
         '--config.train.eval_every=5', '--config.train.checkpoint_every=2',
         '--config.train.keep_checkpoints=3', '--config.data.num_eval_batches=16']
    return a + ([f'--config.data.tokenizer_path={tokenizer}'] if tokenizer else [])
  return args


def train_scenario(root: Path, kills: int, steps: int, rng: random.Random) -> Outcome:
  reference = root / 'train_reference'
  # The reference trains the tokenizer; the killed runs reuse that file (same pieces).
  args = _pretrain_args(steps)
  ref_args = lambda workdir: args(workdir) if workdir == reference else _pretrain_args(
      steps, reference / 'tokenizer.model')(workdir)
  return _training_scenario('train', ref_args, root / 'train', reference, kills, 5, rng)


def finetune_scenario(root: Path, kills: int, steps: int, rng: random.Random) -> Outcome:
  pretrained = root / 'train_reference'
  if not (pretrained / 'checkpoints').exists():
    _run_to_end(_pretrain_args(20)(pretrained), root / 'pretrain.log')

  def args(workdir: Path) -> list[str]:
    return ['finetune', '--config=configs/finetune.py:demo', f'--workdir={workdir}',
            f'--init_checkpoint={pretrained}', '--config.max_len=32',
            f'--config.train.total_steps={steps}', '--config.train.budget_s=0',
            '--config.train.batch_size=16', '--config.train.warmup_steps=2',
            '--config.train.log_every=1', '--config.train.eval_every=5',
            '--config.train.checkpoint_every=2', '--config.train.keep_checkpoints=3']
  return _training_scenario('finetune', args, root / 'finetune', root / 'finetune_reference',
                            kills, 5, rng)


def compress_scenario(root: Path, kills: int, rng: random.Random) -> Outcome:
  pretrained = root / 'train_reference'
  if not (pretrained / 'checkpoints').exists():
    _run_to_end(_pretrain_args(20)(pretrained), root / 'pretrain.log')
  args = lambda out: ['compress', f'--checkpoint={pretrained}', f'--out={out}',
                      '--config=configs/compress.py:prune50_int4']
  reference, out, log = root / 'compress_reference', root / 'compressed', root / 'compress.log'
  ref_s = _run_to_end(args(reference), root / 'compress_reference.log')
  records, notes, never_partial = [], [], True
  start = time.perf_counter()
  while len(records) < kills:
    t0 = time.perf_counter()
    proc = _start(args(out), log)
    if _wait_for(proc, lambda: False, rng.uniform(0.3, ref_s)) or proc.poll() is not None:
      proc.wait()
      notes.append(f'compress finished after {len(records)} kills')
      break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    landed = 'writing' if any(p.name.startswith('.compressed.tmp') for p in root.iterdir()) \
        else 'before writing'
    if out.exists():  # the rename is the last act: an output folder must be whole
      complete = (out / 'compressed' / 'manifest.json').exists() and (out / 'config.json').exists()
      never_partial &= complete
      landed = 'after the rename'
    records.append(Kill('random', time.perf_counter() - t0, landed, -1, -1))
    if out.exists():
      break
  if not out.exists():
    _run_to_end(args(out), log)
  manifest = lambda d: json.loads((d / 'compressed' / 'manifest.json').read_text())['leaves']
  checks = {'an interrupted compress never left a partial output folder': never_partial,
            'output payload identical to the reference (checksums)':
                manifest(out) == manifest(reference),
            f'{kills} kills made': len(records) == kills or out.exists()}
  return Outcome('compress', records, checks, ref_s, time.perf_counter() - start, notes)


def _sweep_args(workdir: Path) -> list[str]:
  # Pretraining and fine-tuning stop by steps (no time budget), so results do not depend on
  # the machine's speed.
  return ['sweep', '--config=configs/sweep.py:tiny', f'--workdir={workdir}',
          '--config.sizes=((1, 32),)', '--config.sparsities=(0.5,)', '--config.bits=(8,)',
          '--config.prune_quantize=((0.5, 4),)', '--config.pretrain_budget_s=100000',
          '--config.pretrain_total_steps=20', '--config.finetune_overrides.train.budget_s=0.0']


def sweep_scenario(root: Path, kills: int, rng: random.Random) -> Outcome:
  reference, workdir, log = root / 'sweep_reference', root / 'sweep', root / 'sweep.log'
  ref_s = _run_to_end(_sweep_args(reference), root / 'sweep_reference.log')
  total_cells = len((reference / 'results.jsonl').read_text().splitlines())
  records, notes, clean_lines, done = [], [], True, 0
  start = time.perf_counter()
  while len(records) < kills:
    t0 = time.perf_counter()
    proc = _start(_sweep_args(workdir), log)
    # A rerun skips the cells already written, so each kill aims within what is left of the
    # work (else a short sweep finishes before all its kills are made).
    remaining = max(0.1, 1.0 - done / total_cells)
    if (_wait_for(proc, lambda: False, rng.uniform(2.0, 0.6 * ref_s * remaining))
        or proc.poll() is not None):
      proc.wait()
      notes.append(f'the sweep finished after {len(records)} kills')
      break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    results = workdir / 'results.jsonl'
    cells = [json.loads(l)['cell'] for l in results.read_text().splitlines()
             if _is_json(l)] if results.exists() else []
    done = len(cells)
    records.append(Kill('random', time.perf_counter() - t0, f'{len(cells)} cells done', -1, -1))
  _run_to_end(_sweep_args(workdir), log)
  lines = (workdir / 'results.jsonl').read_text().split('\n')
  clean_lines = lines[-1] == '' and all(_is_json(l) for l in lines[:-1])
  rows = [json.loads(l) for l in lines[:-1]]
  ref_rows = [json.loads(l) for l in (reference / 'results.jsonl').read_text().splitlines()]
  cells = [r['cell'] for r in rows]
  numbers = lambda rs: sorted((r['cell'], r['pretrain_steps'], r['pretrain_eval_loss'],
                               r['accuracy'], r['eval_loss'], r['stored_bytes']) for r in rs)
  checks = {'results.jsonl: no half line': clean_lines,
            'results.jsonl: no duplicate cell': len(cells) == len(set(cells)),
            'results.jsonl: the reference cells and numbers': numbers(rows) == numbers(ref_rows),
            f'{kills} kills made': len(records) == kills}
  return Outcome('sweep', records, checks, ref_s, time.perf_counter() - start, notes)


# ------------------------------------------------------------------ report


def format_outcome(o: Outcome) -> str:
  lines = [f'== {o.scenario}: {len(o.kills)} kills, reference {o.reference_s:.0f} s, '
           f'killed and rerun {o.faulty_s:.0f} s',
           f'{"kill":>4}  {"aimed at":<8}  {"after s":>7}  {"landed in":<16}  '
           f'{"logged step":>11}  {"checkpoint":>10}  {"next run resumed from":>21}']
  for i, k in enumerate(o.kills, 1):
    show = lambda v: '-' if v < 0 else str(v)
    lines.append(f'{i:>4}  {k.aim:<8}  {k.after_s:>7.1f}  {k.landed:<16}  '
                 f'{show(k.logged_step):>11}  {show(k.checkpoint):>10}  '
                 f'{show(k.resumed_from):>21}')
  for check, ok in o.checks.items():
    lines.append(f'  [{"ok" if ok else "FAIL"}] {check}')
  lines += [f'  note: {n}' for n in o.notes]
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--scenario', default='train',
                      help=f'comma-separated, from {", ".join(SCENARIOS)} (or "all")')
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--steps', type=int, default=0,
                      help='training steps (default: 6 x kills, at least 30; --short: 12)')
  parser.add_argument('--short', action='store_true', help='few steps: for the tests')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default=None, help='kept afterwards (default: a temp dir)')
  a = parser.parse_args(argv)
  scenarios = SCENARIOS if a.scenario == 'all' else tuple(a.scenario.split(','))
  unknown = set(scenarios) - set(SCENARIOS)
  if unknown:
    parser.error(f'unknown scenario {", ".join(sorted(unknown))}; allowed: '
                 f'{", ".join(SCENARIOS)}, all')
  steps = a.steps or (12 if a.short else max(30, 6 * a.kills))
  rng = random.Random(a.seed)
  root = Path(a.workdir or tempfile.mkdtemp(prefix='trainbig_faults_')).absolute()
  root.mkdir(parents=True, exist_ok=True)
  outcomes = []
  for name in scenarios:
    if name == 'train':
      outcome = train_scenario(root, a.kills, steps, rng)
    elif name == 'finetune':
      outcome = finetune_scenario(root, a.kills, steps, rng)
    elif name == 'compress':
      outcome = compress_scenario(root, a.kills, rng)
    else:
      outcome = sweep_scenario(root, a.kills, rng)
    print(format_outcome(outcome), flush=True)
    outcomes.append(outcome)
  print('\nsummary')
  print(f'{"scenario":<10} {"kills":>5} {"resumes":>7}  result')
  for o in outcomes:
    print(f'{o.scenario:<10} {len(o.kills):>5} {len(o.kills):>7}  '
          f'{"all checks passed" if o.ok else "FAILED: " + ", ".join(k for k, v in o.checks.items() if not v)}')
  print(f'(run folders and logs in {root})')
  if a.workdir is None and all(o.ok for o in outcomes):
    shutil.rmtree(root, ignore_errors=True)
  return 0 if all(o.ok for o in outcomes) else 1


if __name__ == '__main__':
  sys.exit(main())

"""Mutation testing of the modules that decide results: does the suite fail on small bugs?

For each module below, mutmut (the `mutation` extra) makes small changes to the code, one at a
time (`<` -> `<=`, `+ 1` -> `+ 2`, a dropped argument, ...), and runs only the fast tests
listed for that module, and of those only the tests that call the mutated function (mutmut
records which tests reach which function in a first, clean run). A mutant is killed when a
test fails (or hangs past mutmut's timeout); it survives when every test still passes.

Each module runs in its own scratch copy of the repository (build/mutation/<name>/), one
module after the other, so the tool's caches never mix modules and nothing in the work tree is
touched. The script prints, per module, the share of mutants killed and the survivors; the
survivors that no behaviour can tell from the original are listed with the reason in
docs/mutation.md, and every other survivor should get a test.

  make mutation                                       # 25 of each module's mutants
  python benchmarks/mutation.py                       # every mutant of every module (hours)
  python benchmarks/mutation.py claims plan           # some modules (names as in MODULES)
  python benchmarks/mutation.py --max_children=1 --show_diffs storage
  python benchmarks/mutation.py --retest_survivors prune   # after adding tests
  python benchmarks/mutation.py --resume storage           # go on after a stopped run
  python benchmarks/mutation.py --sample=40 --seed=0 loop   # a uniform random sample of mutants
  python benchmarks/mutation.py --sample=60 --seed=0 --resume loop   # grow that sample to 60
  python benchmarks/mutation.py --sample=15 steps+checkpoint+loop     # 15 of each, one run
  python benchmarks/mutation.py storage --mutants '*_read_payload__mutmut_12'  # named ones

A sample run tests N mutants drawn uniformly at random (seeded) from all the module's mutants
and reports the kill rate over the sample with its 95% Wilson interval: the way to measure the
modules whose covering tests compile and train a model, where a full run takes hours on 2
cores. The draw is a seeded shuffle of every mutant's name, so a larger N with the same seed
keeps the first sample and adds to it (`--resume` tests only the ones not yet tested).

Modules joined by `+` run as one group in one scratch copy: mutmut's first, clean run of the
tests (which records what each test reaches) is then made once for the group instead of once
per module, which is most of the cost when the covering tests train a model. Kill rates are
still reported per module, and a group's sample draws N mutants from each module.

It is CPU heavy: run it under `nice` on a shared machine (`make mutation` does).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (module path, the fast test files or test ids that cover it), cheapest module first.
# Per mutant, mutmut runs only the listed tests that reach the mutated function, fastest first,
# and pytest's -x ends the run at the first failure.
MODULES: dict[str, tuple[str, list[str]]] = {
    'claims': ('trainbig_jax/experiments/claims.py',
               ['tests/test_teeth_claims.py', 'tests/test_claims_intervals.py',
                'tests/test_report.py']),
    'plan': ('trainbig_jax/experiments/plan.py',
             ['tests/test_teeth_plan.py', 'tests/test_report.py']),
    'storage': ('trainbig_jax/compress/storage.py',
                ['tests/test_teeth_compress.py', 'tests/test_compress.py']),
    'quantize': ('trainbig_jax/compress/quantize.py',
                 ['tests/test_teeth_numerics.py', 'tests/test_teeth_compress.py',
                  'tests/test_compress.py']),
    'prune': ('trainbig_jax/compress/prune.py',
              ['tests/test_teeth_compress.py', 'tests/test_compress.py']),
    'mlm': ('trainbig_jax/data/mlm.py',
            ['tests/test_teeth_numerics.py', 'tests/test_data_pretrain.py']),
    'steps': ('trainbig_jax/train/steps.py',
              ['tests/test_sharding.py', 'tests/test_teeth_train.py']),
    'checkpoint': ('trainbig_jax/train/checkpoint.py',
                   ['tests/test_teeth_train.py', 'tests/test_pretrain.py']),
    'loop': ('trainbig_jax/train/loop.py',
             ['tests/test_teeth_train.py', 'tests/test_pretrain.py']),
}

# mutmut's exit-code statuses that count as the suite noticing the mutant.
KILLED = {'killed', 'timeout', 'caught by type check'}
# A mutant of a run stopped before reaching it.
NOT_TESTED = 'not checked'


def _toml_list(items: list[str]) -> str:
  return '[' + ', '.join(repr(x).replace("'", '"') for x in items) + ']'


def group(name: str) -> list[str]:
  """The modules of a name: one module, or several joined by '+' (run in one scratch copy)."""
  return name.split('+')


def _dotted(module: str) -> str:
  return module.removesuffix('.py').replace('/', '.') + '.'


def prepare(name: str, work_root: Path, keep_results: bool = False) -> Path:
  """A scratch copy of the package and the module's tests, with mutmut configured for it.

  With keep_results, an earlier run's copy keeps mutmut's results and only its tests and test
  selection are refreshed (to retest that run's survivors against new tests).
  """
  modules = [MODULES[part][0] for part in group(name)]
  tests = list(dict.fromkeys(t for part in group(name) for t in MODULES[part][1]))
  tests = [t for t in tests if (REPO / t.split('::')[0]).exists()]
  work = work_root / name
  if keep_results and (work / 'mutants').is_dir():
    for tests_dir in (work / 'tests', work / 'mutants' / 'tests'):
      shutil.rmtree(tests_dir, ignore_errors=True)
      shutil.copytree(REPO / 'tests', tests_dir, ignore=shutil.ignore_patterns('__pycache__'))
  else:
    if work.exists():
      shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(REPO / 'trainbig_jax', work / 'trainbig_jax',
                    ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copytree(REPO / 'tests', work / 'tests', ignore=shutil.ignore_patterns('__pycache__'))
    # The CLI tests name config files by their path from the repository root.
    shutil.copytree(REPO / 'configs', work / 'configs', ignore=shutil.ignore_patterns('__pycache__'))
  pyproject = (REPO / 'pyproject.toml').read_text()
  pyproject += f"""
[tool.mutmut]
source_paths = ["trainbig_jax"]
also_copy = ["configs"]
only_mutate = {_toml_list(modules)}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]
pytest_add_cli_args_test_selection = {_toml_list(tests)}
# Workers fork from a server that imported the tests but never started XLA: forking a process
# whose XLA thread pools are running can deadlock the child.
process_isolation = "forkserver"
use_git_change_detection = false
"""
  (work / 'pyproject.toml').write_text(pyproject)
  return work


# Makes mutmut's mutants (the first phase of `mutmut run`) without running any test, so that a
# sample can be drawn from their names before the run.
_GENERATE = '''
import os
import mutmut.__main__ as m
m.set_mutant_under_test('mutant_generation')
os.makedirs('mutants', exist_ok=True)
m.copy_src_dir()
m.copy_also_copy_files()
m.setup_source_paths()
m.create_mutants(1)
'''


def mutant_names(name: str, work: Path, env: dict) -> dict[str, list[str]]:
  """Every mutant mutmut makes of each module of the group, sorted (generating them if not yet
  made)."""
  metas = {part: work / 'mutants' / (MODULES[part][0] + '.meta') for part in group(name)}
  if not all(meta.exists() for meta in metas.values()):
    subprocess.run([sys.executable, '-c', _GENERATE], cwd=work, env=env, check=True,
                   capture_output=True)
  return {part: sorted(json.loads(meta.read_text())['exit_code_by_key'])
          for part, meta in metas.items()}


def draw_sample(names: list[str], size: int, seed: int) -> list[str]:
  """A uniform random sample of `size` names: the first `size` of a seeded shuffle, so a
  larger size with the same seed extends the smaller sample."""
  order = list(names)
  random.Random(seed).shuffle(order)
  return order[:size]


def wilson_interval(killed: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """The 95% Wilson score interval of a binomial share killed / n."""
  if n == 0:
    return 0.0, 1.0
  p = killed / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(0.0, centre - half), min(1.0, centre + half)


def _statuses(mutmut: list[str], work: Path, env: dict) -> dict[str, str]:
  out = subprocess.run(mutmut + ['results', '--all', 'true'], cwd=work, env=env,
                       capture_output=True, text=True).stdout
  statuses: dict[str, str] = {}
  for line in out.splitlines():
    m = re.match(r'\s*(\S+): (.+)$', line)
    if m:
      statuses[m.group(1)] = m.group(2).strip()
  return statuses


def run_module(name: str, work_root: Path, max_children: int, show_diffs: bool,
               retest_survivors: bool = False, resume: bool = False,
               sample: int | None = None, seed: int = 0,
               mutants: list[str] | None = None) -> list[dict]:
  work = prepare(name, work_root, keep_results=retest_survivors or resume or bool(mutants))
  env = dict(os.environ)
  env.pop('PYTHONPATH', None)  # mutmut puts its mutants/ copy first on the path itself
  env.setdefault('TRAINBIG_TEST_DATA_DIR', os.environ.get('TRAINBIG_DATA_DIR', ''))
  if not env['TRAINBIG_TEST_DATA_DIR']:
    env.pop('TRAINBIG_TEST_DATA_DIR')
  mutmut = [sys.executable, '-m', 'mutmut']
  names, previous = [], {}
  saved = work / 'statuses.json'
  if retest_survivors or resume or mutants:
    # A changed test selection makes mutmut forget every verdict, so the last run's verdicts
    # are kept here and only those of the mutants tested now are replaced.
    previous = json.loads(saved.read_text()) if saved.exists() else {}
    # mutmut's own verdicts are newer where it has one (a stopped run saves none here).
    previous.update({k: v for k, v in _statuses(mutmut, work, env).items()
                     if v != NOT_TESTED or k not in previous})
  if retest_survivors:  # mutmut reruns the mutants it is given by name
    names = [k for k, v in previous.items() if v not in KILLED and v != NOT_TESTED]
  if mutants:  # names or globs, as mutmut takes them
    names = list(mutants)
  sample_file = work / 'sample.json'
  if sample is not None:  # the sample is recorded beside the statuses, for later resumes
    drawn = [k for names_of_part in mutant_names(name, work, env).values()
             for k in draw_sample(names_of_part, sample, seed)]
    sample_file.write_text(json.dumps({'seed': seed, 'size': sample, 'names': drawn}, indent=0))
  in_sample = set(json.loads(sample_file.read_text())['names']) if sample_file.exists() else None
  if in_sample is not None and not retest_survivors and not mutants:
    # a sample's mutants not yet tested (all of them on a fresh run), by name
    names = sorted(k for k in in_sample if previous.get(k, NOT_TESTED) == NOT_TESTED)
    if not names:
      print(f'{name}: every mutant of the sample is already tested', flush=True)
  start = time.time()
  log = work / ('mutmut-retest.log' if retest_survivors else 'mutmut-run.log')
  with open(log, 'w') as f:
    proc = (subprocess.run(mutmut + ['run', f'--max-children={max_children}'] + names, cwd=work,
                           env=env, stdout=f, stderr=subprocess.STDOUT)
            if names or in_sample is None else subprocess.CompletedProcess([], 0))
  seconds = time.time() - start
  statuses = _statuses(mutmut, work, env)
  for k, v in previous.items():
    if statuses.get(k, NOT_TESTED) == NOT_TESTED or (
        names and not any(fnmatch.fnmatchcase(k, n) for n in names)):
      statuses[k] = v
  saved.write_text(json.dumps(statuses, indent=0, sort_keys=True))
  if proc.returncode != 0 or not statuses:
    print(f'  mutmut run exited {proc.returncode}; see {log}', flush=True)
  return [_report(part, statuses, in_sample, seconds, proc.returncode, log, work, env, mutmut,
                  show_diffs) for part in group(name)]


def _report(name: str, all_statuses: dict[str, str], in_sample: set[str] | None,
            seconds: float, returncode: int, log: Path, work: Path, env: dict,
            mutmut: list[str], show_diffs: bool) -> dict:
  """Prints and returns one module's kill rate and survivors."""
  statuses = {k: v for k, v in all_statuses.items() if k.startswith(_dotted(MODULES[name][0]))}
  in_sample = None if in_sample is None else {k for k in in_sample if k in statuses}
  tested = {k: v for k, v in statuses.items()
            if v != NOT_TESTED and (in_sample is None or k in in_sample)}
  survivors = sorted(k for k, v in tested.items() if v not in KILLED)
  killed = len(tested) - len(survivors)
  result = {'name': name, 'module': MODULES[name][0], 'total': len(tested), 'killed': killed,
            'made': len(statuses), 'survivors': {k: statuses[k] for k in survivors},
            'seconds': seconds, 'returncode': returncode, 'log': str(log),
            'sample': None if in_sample is None else len(in_sample)}
  share = killed / len(tested) if tested else float('nan')
  if in_sample is not None:
    low, high = wilson_interval(killed, len(tested))
    result['interval'] = (low, high)
    untested = (f'  (a SAMPLE: {len(tested)} of {len(in_sample)} drawn at random from '
                f'{len(statuses)} mutants; 95% Wilson interval {100 * low:.1f}-{100 * high:.1f}%'
                + (f'; {len(in_sample) - len(tested)} of the sample not tested: run stopped, '
                   f'--resume goes on, and the tested part is no longer uniform'
                   if len(tested) < len(in_sample) else '') + ')')
  else:
    untested = (f'  ({len(statuses) - len(tested)} of {len(statuses)} not tested: run stopped; '
                f'--resume goes on)' if len(tested) < len(statuses) else '')
  print(f'{name:<11} {killed:>4}/{len(tested):<4} killed ({100 * share:5.1f}%)  '
        f'{seconds:6.0f} s  {MODULES[name][0]}{untested}', flush=True)
  for k in survivors:
    print(f'  survived ({statuses[k]}): {k}', flush=True)
    if show_diffs:
      diff = subprocess.run(mutmut + ['show', k], cwd=work, env=env, capture_output=True,
                            text=True).stdout
      print('    ' + '\n    '.join(diff.strip().splitlines()[3:]), flush=True)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('modules', nargs='*', default=[],
                      help=f'modules to test (default: all, cheapest first): {", ".join(MODULES)}')
  parser.add_argument('--max_children', type=int, default=2,
                      help='mutants tested at once (default 2: a 2-core machine)')
  parser.add_argument('--work_dir', default=str(REPO / 'build' / 'mutation'))
  parser.add_argument('--show_diffs', action='store_true', help='print each survivor\'s diff')
  parser.add_argument('--retest_survivors', action='store_true',
                      help='keep the last run\'s results and retest only its survivors against '
                           'the current tests (after adding tests)')
  parser.add_argument('--resume', action='store_true',
                      help='keep the last run\'s results and test only the mutants it did not '
                           'reach (a stopped run)')
  parser.add_argument('--sample', type=int, default=None, metavar='N',
                      help='test a uniform random sample of N of each module\'s mutants (and '
                           'report the kill rate with its 95%% Wilson interval); with --resume, '
                           'grows the last sample to N')
  parser.add_argument('--seed', type=int, default=0, help='the sample\'s random seed')
  parser.add_argument('--mutants', nargs='+', default=None, metavar='NAME',
                      help='test only these mutants (names or globs as mutmut takes them), '
                           'keeping the other verdicts of an earlier run')
  args = parser.parse_args()
  if args.sample is not None and (args.sample < 1 or args.retest_survivors):
    parser.error(f'--sample must be a positive count and cannot go with --retest_survivors; '
                 f'got --sample={args.sample}')
  names = args.modules or list(MODULES)
  unknown = [part for n in names for part in group(n) if part not in MODULES]
  if unknown:
    parser.error(f'unknown module(s) {", ".join(unknown)}; known: {", ".join(MODULES)}')
  print(f'{"module":<11} killed/total            time  file', flush=True)
  results = [r for n in names
             for r in run_module(n, Path(args.work_dir), args.max_children, args.show_diffs,
                                 args.retest_survivors, args.resume, args.sample, args.seed,
                                 args.mutants)]
  print('\nsummary (share of mutants killed):')
  for r in results:
    share = 100 * r['killed'] / r['total'] if r['total'] else float('nan')
    sample = (f', a random sample of {r["sample"]}: 95% interval '
              f'{100 * r["interval"][0]:.1f}-{100 * r["interval"][1]:.1f}%' if r['sample'] else '')
    print(f'  {r["name"]:<11} {share:5.1f}%  ({r["killed"]}/{r["total"]} tested of '
          f'{r["made"]} made{sample}, {len(r["survivors"])} survived, {r["seconds"]:.0f} s)')


if __name__ == '__main__':
  main()

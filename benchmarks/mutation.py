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

  python benchmarks/mutation.py                       # every module, cheapest first
  python benchmarks/mutation.py claims plan           # some modules (names as in MODULES)
  python benchmarks/mutation.py --max_children=1 --show_diffs storage
  python benchmarks/mutation.py --retest_survivors prune   # after adding tests
  python benchmarks/mutation.py --resume storage           # go on after a stopped run

It is CPU heavy: run it under `nice` on a shared machine (`make mutation` does).
"""

from __future__ import annotations

import argparse
import json
import os
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
               ['tests/test_teeth_claims.py', 'tests/test_report.py']),
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
              ['tests/test_teeth_numerics.py', 'tests/test_sharding.py']),
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


def prepare(name: str, work_root: Path, keep_results: bool = False) -> Path:
  """A scratch copy of the package and the module's tests, with mutmut configured for it.

  With keep_results, an earlier run's copy keeps mutmut's results and only its tests and test
  selection are refreshed (to retest that run's survivors against new tests).
  """
  module, tests = MODULES[name]
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
  pyproject = (REPO / 'pyproject.toml').read_text()
  pyproject += f"""
[tool.mutmut]
source_paths = ["trainbig_jax"]
only_mutate = ["{module}"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]
pytest_add_cli_args_test_selection = {_toml_list(tests)}
# Workers fork from a server that imported the tests but never started XLA: forking a process
# whose XLA thread pools are running can deadlock the child.
process_isolation = "forkserver"
use_git_change_detection = false
"""
  (work / 'pyproject.toml').write_text(pyproject)
  return work


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
               retest_survivors: bool = False, resume: bool = False) -> dict:
  work = prepare(name, work_root, keep_results=retest_survivors or resume)
  env = dict(os.environ)
  env.pop('PYTHONPATH', None)  # mutmut puts its mutants/ copy first on the path itself
  env.setdefault('TRAINBIG_TEST_DATA_DIR', os.environ.get('TRAINBIG_DATA_DIR', ''))
  if not env['TRAINBIG_TEST_DATA_DIR']:
    env.pop('TRAINBIG_TEST_DATA_DIR')
  mutmut = [sys.executable, '-m', 'mutmut']
  names, previous = [], {}
  saved = work / 'statuses.json'
  if retest_survivors or resume:
    # A changed test selection makes mutmut forget every verdict, so the last run's verdicts
    # are kept here and only those of the mutants tested now are replaced.
    previous = json.loads(saved.read_text()) if saved.exists() else {}
    # mutmut's own verdicts are newer where it has one (a stopped run saves none here).
    previous.update({k: v for k, v in _statuses(mutmut, work, env).items()
                     if v != NOT_TESTED or k not in previous})
  if retest_survivors:  # mutmut reruns the mutants it is given by name
    names = [k for k, v in previous.items() if v not in KILLED and v != NOT_TESTED]
  start = time.time()
  log = work / ('mutmut-retest.log' if retest_survivors else 'mutmut-run.log')
  with open(log, 'w') as f:
    proc = subprocess.run(mutmut + ['run', f'--max-children={max_children}'] + names, cwd=work,
                          env=env, stdout=f, stderr=subprocess.STDOUT)
  seconds = time.time() - start
  statuses = _statuses(mutmut, work, env)
  for k, v in previous.items():
    if statuses.get(k, NOT_TESTED) == NOT_TESTED or (names and k not in names):
      statuses[k] = v
  saved.write_text(json.dumps(statuses, indent=0, sort_keys=True))
  tested = {k: v for k, v in statuses.items() if v != NOT_TESTED}
  survivors = sorted(k for k, v in tested.items() if v not in KILLED)
  killed = len(tested) - len(survivors)
  result = {'name': name, 'module': MODULES[name][0], 'total': len(tested), 'killed': killed,
            'made': len(statuses), 'survivors': {k: statuses[k] for k in survivors},
            'seconds': seconds, 'returncode': proc.returncode, 'log': str(log)}
  share = killed / len(tested) if tested else float('nan')
  untested = (f'  ({len(statuses) - len(tested)} of {len(statuses)} not tested: run stopped; '
              f'--resume goes on)' if len(tested) < len(statuses) else '')
  print(f'{name:<11} {killed:>4}/{len(tested):<4} killed ({100 * share:5.1f}%)  '
        f'{seconds:6.0f} s  {MODULES[name][0]}{untested}', flush=True)
  if proc.returncode != 0 or not statuses:
    print(f'  mutmut run exited {proc.returncode}; see {log}', flush=True)
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
  args = parser.parse_args()
  names = args.modules or list(MODULES)
  unknown = [n for n in names if n not in MODULES]
  if unknown:
    parser.error(f'unknown module(s) {", ".join(unknown)}; known: {", ".join(MODULES)}')
  print(f'{"module":<11} killed/total            time  file', flush=True)
  results = [run_module(n, Path(args.work_dir), args.max_children, args.show_diffs,
                        args.retest_survivors, args.resume) for n in names]
  print('\nsummary (share of mutants killed):')
  for r in results:
    share = 100 * r['killed'] / r['total'] if r['total'] else float('nan')
    print(f'  {r["name"]:<11} {share:5.1f}%  ({r["killed"]}/{r["total"]} tested of '
          f'{r["made"]} made, {len(r["survivors"])} survived, {r["seconds"]:.0f} s)')


if __name__ == '__main__':
  main()

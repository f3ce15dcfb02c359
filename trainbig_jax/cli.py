"""trainbig: one entry point for every stage of the pipeline.

  trainbig train     --config=configs/pretrain.py:demo --workdir=DIR [--config.FIELD=VALUE]
  trainbig finetune  --config=configs/finetune.py:demo --init_checkpoint=RUN --workdir=DIR
  trainbig compress  --checkpoint=RUN --config=configs/compress.py:PRESET --out=DIR
  trainbig eval      --checkpoint=RUN_OR_COMPRESSED [--int8] [--json]
  trainbig translate --checkpoint=RUN_OR_COMPRESSED --input=FILE|- [--output=FILE]
  trainbig sweep     --config=configs/sweep.py:demo --workdir=DIR
  trainbig report    --sweep=DIR
  trainbig plan      --sweep=DIR --train_budget_s=T --serve_budget_mb=M
  trainbig demo      [--workdir=DIR]
  trainbig prepare   --dataset=NAME [--dataset=NAME ...] [--data_dir=DIR]
  trainbig plan-memory --config=configs/pretrain.py:PRESET --mesh='(1,8,1)' --accelerator=v5e
                     [--all_presets: the paper's depth and width grids into docs/memory.md]

Errors a user can cause end in one line on stderr and exit status 2; set TRAINBIG_DEBUG=1
for the full traceback.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from trainbig_jax.train import distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file and preset: path.py:PRESET.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (created; resumed if it exists).')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A run folder or a compressed checkpoint.')
_INIT_CHECKPOINT = flags.DEFINE_string('init_checkpoint', None, 'Pretrained run to fine-tune.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (must not exist).')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of text.')
_INT8 = flags.DEFINE_bool('int8', False, 'eval: run the Dense layers as int8 x int8 -> int32 '
                          'matmuls (a quantized checkpoint\'s own codes).')
_SWEEP = flags.DEFINE_string('sweep', None, 'A sweep folder.')
_TRAIN_BUDGET = flags.DEFINE_float('train_budget_s', None, 'Training budget in seconds.')
_SERVE_BUDGET = flags.DEFINE_float('serve_budget_mb', None, 'Serving budget in megabytes.')
_INPUT = flags.DEFINE_string('input', None, 'Text to translate, one sentence a line; - is stdin.')
_OUTPUT = flags.DEFINE_string('output', None, 'Where translations go (default: stdout).')
_DATASET = flags.DEFINE_multi_string('dataset', None, 'A TFDS name, files:GLOB or parallel:... '
                                     'dataset; repeat the flag for several.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Data folder (default: $TRAINBIG_DATA_DIR '
                                'or ~/.cache/trainbig_jax/tfds).')
_MESH = flags.DEFINE_string('mesh', None, "plan-memory: mesh sizes (data, fsdp, tensor), e.g. "
                            "'(1,8,1)'.")
_ACCELERATOR = flags.DEFINE_string('accelerator', None, 'plan-memory: target accelerator, one of '
                                   'v4, v5e, v5p, v6e, A100-40, A100-80, H100-80, H200.')
_ALL_PRESETS = flags.DEFINE_bool('all_presets', False, "plan-memory: the paper's depth and width "
                                 'grid presets, as a table in docs/memory.md (--accelerator may '
                                 'then list several, comma-separated).')
_RULES = flags.DEFINE_enum('rules', 'interval', ['interval', 'strict'],
                           'Claim rules: bootstrap intervals (held / not held / undecided) '
                           'or the strict point rules.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join a multi-process job found by JAX (TPU pod, SLURM, ...); the '
    'TRAINBIG_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID variables do so without this flag.')

COMMANDS = ('train', 'finetune', 'compress', 'eval', 'translate', 'sweep', 'report', 'plan',
            'demo', 'prepare', 'plan-memory')


class UsageError(ValueError):
  pass


def _need(flag, name: str, command: str):
  if flag.value is None:
    raise UsageError(f'trainbig {command} needs --{name}.')
  return flag.value


def _train(command: str) -> None:
  from trainbig_jax import tasks
  config = _need(_CONFIG, 'config', command)
  summary = tasks.task_of(config).train(config, _need(_WORKDIR, 'workdir', command),
                                        init_checkpoint=_INIT_CHECKPOINT.value)
  _print_summary(command, summary)


def _print_summary(command: str, summary) -> None:
  if _JSON.value:
    print(json.dumps(summary.__dict__))
    return
  metrics = ', '.join(f'{name} {value:.4f}' for name, value in summary.metrics.items())
  evaluated = f'; {metrics}' if metrics else ''
  print(f'{command}: stopped by {summary.stopped_by} at step {summary.step} after '
        f'{summary.wall_time_s:.1f}s of training{evaluated}')


def _finetune(command: str) -> None:
  from trainbig_jax import tasks
  config = _need(_CONFIG, 'config', command)
  summary = tasks.task_of(config).train(config, _need(_WORKDIR, 'workdir', command),
                                        init_checkpoint=_need(_INIT_CHECKPOINT,
                                                              'init_checkpoint', command))
  _print_summary(command, summary)


def _compress(command: str) -> None:
  from trainbig_jax.compress.checkpoints import compress_checkpoint
  summary = compress_checkpoint(_need(_CHECKPOINT, 'checkpoint', command),
                                _need(_CONFIG, 'config', command), _need(_OUT, 'out', command))
  if _JSON.value:
    print(json.dumps(summary))
    return
  print(f"compress: wrote {summary['out']}: {summary['compressed_bytes']:,} bytes stored vs "
        f"{summary['dense_fp32_bytes']:,} dense fp32 ({summary['compression_ratio']:.2f}x); "
        f"{summary['nonzero_params']:,} of {summary['total_params']:,} weights nonzero")


def _eval(command: str) -> None:
  from trainbig_jax.evaluate import evaluate_checkpoint
  result = evaluate_checkpoint(_need(_CHECKPOINT, 'checkpoint', command), int8=_INT8.value)
  if _JSON.value:
    print(json.dumps(result))
    return
  for key, value in result.items():
    print(f'{key:>18}: {value:,.4f}' if isinstance(value, float) else
          f'{key:>18}: {value:,}' if isinstance(value, int) else f'{key:>18}: {value}')


def _translate(command: str) -> None:
  from trainbig_jax.translator import translate_file
  translate_file(_need(_CHECKPOINT, 'checkpoint', command), _need(_INPUT, 'input', command),
                 _OUTPUT.value)


def _sweep(command: str) -> None:
  from trainbig_jax.experiments.sweep import run_sweep
  results = run_sweep(_need(_CONFIG, 'config', command), _need(_WORKDIR, 'workdir', command),
                      progress=_progress_line)
  print(f'sweep: results in {results}')


def _report(command: str) -> None:
  from trainbig_jax.experiments.report import claims_table, write_report
  report = write_report(_need(_SWEEP, 'sweep', command), rules=_RULES.value)
  claims = json.loads((report.parent / 'claims.json').read_text())
  print(claims_table(claims))
  print(f'report: {report}')


def _plan(command: str) -> None:
  from trainbig_jax.experiments.plan import format_recommendation, recommend
  from trainbig_jax.experiments.results import load_curves, load_results
  sweep = _need(_SWEEP, 'sweep', command)
  advice = recommend(load_results(sweep), load_curves(sweep),
                     _need(_TRAIN_BUDGET, 'train_budget_s', command),
                     _need(_SERVE_BUDGET, 'serve_budget_mb', command))
  print(json.dumps(advice, default=str) if _JSON.value else format_recommendation(advice))


def _demo(command: str) -> None:
  from trainbig_jax.configs import sweep as sweep_configs
  from trainbig_jax.experiments.report import claims_table, write_report
  from trainbig_jax.experiments.sweep import run_sweep
  workdir = _WORKDIR.value or os.path.join('runs', 'demo')
  config = _CONFIG.value if _CONFIG.present else sweep_configs.get_config('demo')
  _progress_line(f'demo: the whole pipeline on the embedded corpora into {workdir} '
                 f'({len(config.sizes)} sizes x {config.pretrain_budget_s:.0f} s pretraining; '
                 f'rerun the same command to resume)')
  run_sweep(config, workdir, progress=_progress_line)
  report = write_report(workdir, rules=_RULES.value)
  claims = json.loads((report.parent / 'claims.json').read_text())
  print(claims_table(claims))
  print(f'demo: report in {report}')


def _prepare(command: str) -> None:
  from trainbig_jax.data import sources
  names = _need(_DATASET, 'dataset', command)
  for name, builder in zip(names, sources.download_and_prepare(names, _DATA_DIR.value)):
    splits = ', '.join(f'{s} {info.num_examples:,}'
                       for s, info in sorted(builder.info.splits.items()))
    print(f'prepare: {name} ready in {builder.data_dir} ({splits} examples)')


def _plan_memory(command: str) -> None:
  mesh_text = _need(_MESH, 'mesh', command)
  accelerator = _need(_ACCELERATOR, 'accelerator', command)
  if 'jax' not in sys.modules:
    # Nothing has started JAX yet: give it as many simulated host devices as the mesh has
    # (TPU targets compile for their topology instead where JAX can describe it).
    sizes = [int(n) for n in re.findall(r'\d+', mesh_text)] or [1]
    xla_flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '',
                       os.environ.get('XLA_FLAGS', ''))
    os.environ['XLA_FLAGS'] = (f'{xla_flags} --xla_force_host_platform_device_count='
                               f'{max(1, math.prod(sizes))}').strip()
    os.environ['JAX_PLATFORMS'] = 'cpu'
  from trainbig_jax.train import memory
  mesh = memory.parse_mesh(mesh_text)
  if _ALL_PRESETS.value:  # one table per accelerator: --accelerator=v5e,H100-80
    names = accelerator.split(',')
    path = memory.write_grid_table('docs/memory.md', mesh, names, progress=_progress_line)
    print(f'{command}: tables for {", ".join(names)} on mesh {mesh} in {path}')
    return
  memory.get_accelerator(accelerator)
  plan = memory.plan_memory(_need(_CONFIG, 'config', command), mesh, accelerator)
  print(json.dumps({**plan.__dict__, 'fits': plan.fits}) if _JSON.value
        else memory.format_plan(plan))


def _progress_line(message: str) -> None:
  print(message, flush=True)


HANDLERS = {'train': _train, 'finetune': _finetune, 'compress': _compress, 'eval': _eval,
            'sweep': _sweep, 'report': _report, 'plan': _plan, 'demo': _demo,
            'translate': _translate, 'prepare': _prepare, 'plan-memory': _plan_memory}


def _dispatch(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] not in COMMANDS:
    given = argv[1] if len(argv) > 1 else '(none)'
    raise UsageError(f'Unknown command {given!r}; allowed: {", ".join(COMMANDS)}.')
  if len(argv) > 2:
    raise UsageError(f'Unexpected arguments {argv[2:]}; options are given as --name=value.')
  if _WORKDIR.value is not None:
    from trainbig_jax.train.runlock import check_folder_path
    check_folder_path(_WORKDIR.value)
  HANDLERS[argv[1]](argv[1])


def _quiet_libraries(record) -> bool:
  # Orbax and grain log every save and read at INFO; keep ours, drop theirs below WARNING.
  noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'grain', 'tensorflow_datasets'))
  return record.levelno >= 30 or not noisy


def _main(argv: list[str]) -> None:
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_quiet_libraries)
  try:
    # Before any other JAX call: the runtime's device list is fixed by the first one.
    distributed.initialize(auto_detect=_DISTRIBUTED.value)
    _dispatch(argv)
  except (ValueError, OSError, KeyError) as e:  # OSError: a missing, unwritable or full path
    if os.environ.get('TRAINBIG_DEBUG'):
      raise
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f'trainbig: error: {msg}', file=sys.stderr)
    distributed.exit_if_joined(2)  # at once: the other processes of a job cannot finish
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a bad --config (path, preset, override) as one error line."""
  try:
    remaining = flags.FLAGS(argv)
    if _CONFIG.present:
      _CONFIG.value.keys()  # config_flags defers a load failure until first use
    return remaining
  except (flags.Error, AttributeError, KeyError, OSError, ValueError, SyntaxError) as e:
    given = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
    path = given[-1].split(':')[0] if given else 'the config file'
    print(f'trainbig: error: --config: {_config_error_message(e, path)}', file=sys.stderr)
    sys.exit(2)


def _config_error_message(e: BaseException, config_path: str = 'the config file') -> str:
  chain = [e]
  while (chain[-1].__cause__ or chain[-1].__context__) is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  syntax = next((c for c in chain if isinstance(c, SyntaxError)), None)
  if syntax is not None:  # not a Python file at all (YAML, JSON, binary, ...)
    where = f' at line {syntax.lineno}' if syntax.lineno else ''
    return (f'{syntax.filename or config_path} is not a Python config file: {syntax.msg}'
            f'{where}; give a .py file with get_config(preset).')
  if isinstance(chain[0], AttributeError) and 'get_config' in str(chain[0]):
    return f'{config_path} has no get_config(preset) function.'
  if isinstance(chain[0], (AttributeError, KeyError)):  # an override naming no field
    text = str(chain[0]).encode().decode('unicode_escape').replace("'", '')
    return 'no such field: ' + ' '.join(l.strip() for l in text.splitlines() if l.strip())
  lines = [l.strip() for l in str(chain[-1]).splitlines() if l.strip()]
  if isinstance(chain[-1], OSError):  # a file that failed to load: its last line says why
    lines = lines[-1:]
  return ' '.join(lines) or type(chain[-1]).__name__


def main() -> None:
  app.run(_main, flags_parser=_parse_flags)


if __name__ == '__main__':
  main()

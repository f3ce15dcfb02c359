"""Training throughput and an honest MFU proxy for one pretraining preset on this machine.

  python benchmarks/train_throughput.py --preset=demo [--steps=20] [--batch_size=B]
      [--seq_len=L] [--dtype=float32|bfloat16] [--mesh=-1,1,1] [--matmul_size=N]

Builds the encoder, the sharded train state and the jitted train step exactly as
`trainbig train` does (same model, optimizer, mesh, shardings, step function), feeds it
synthetic masked batches that are already on the devices (no data-pipeline cost), compiles
once, then times --steps steps, each synchronised on its metrics as the trainer's loop is.

It prints tokens/s, step time, model FLOPs per step counted two ways (XLA's cost analysis of
the compiled step, and the analytic 6*N*T + 12*layers*hidden*seq_len*T, where each parameter
counts the tokens that pass through it: the MLM head and the tied output embedding only see
the masked positions, as in the trainer), the FLOP/s they imply, and, measured in the same run on the same devices, the FLOP/s of large matmuls (fp32,
and the model's dtype when that differs). train FLOP/s / matmul FLOP/s is the MFU proxy: the
share of what this machine demonstrably sustains on dense matmuls, rather than a datasheet
peak. The last line is one JSON object for scripts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.data.mlm import mask_tokens, max_predictions
from trainbig_jax.models.encoder import DTYPES, Encoder, encoder_config
from trainbig_jax.tasks.mlm import check_config, init_params_fn, mlm_sums
from trainbig_jax.train import partitioning
from trainbig_jax.train.flops import analytic_flops, matmul_flops_per_s
from trainbig_jax.train.state import create_sharded_state, make_optimizer
from trainbig_jax.train.steps import make_train_step

SPECIAL_IDS = (0, 1, 2, 3, 4)  # pad, unk, bos, eos, mask (data/tokenizer.py)
NUM_DISTINCT_BATCHES = 2  # cycled, so no step can reuse a cached result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='demo', choices=pretrain_configs.PRESETS)
  parser.add_argument('--steps', type=int, default=10, help='timed steps (after 1 warm-up)')
  parser.add_argument('--batch_size', type=int, default=None, help='default: the preset\'s')
  parser.add_argument('--seq_len', type=int, default=None, help='default: the preset\'s')
  parser.add_argument('--dtype', default=None, choices=sorted(DTYPES),
                      help='activation dtype; default: the preset\'s (parameters stay fp32)')
  parser.add_argument('--mesh', default='-1,1,1', help='data,fsdp,tensor sizes; -1: the rest')
  parser.add_argument('--matmul_size', type=int, default=None,
                      help='N of the N x N matmul reference; default 4096 on accelerators, '
                           '1024 on CPU')
  parser.add_argument('--matmul_reps', type=int, default=None,
                      help='timed matmul repetitions; default: about 2 s worth')
  parser.add_argument('--pipeline_batches', type=int, default=0,
                      help='also time the data pipeline alone (the embedded corpus, the '
                           'trainer\'s packing and masking) over this many host batches')
  parser.add_argument('--pipeline_workdir', default=None,
                      help='where its tokenizer is trained once and reused (default: a temp dir)')
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f'--steps={args.steps} must be at least 1.')
  try:
    args.mesh = tuple(int(s) for s in args.mesh.split(','))
  except ValueError:
    parser.error(f'--mesh={args.mesh!r} must be three integers, e.g. -1,1,1.')
  return args


def build_config(args: argparse.Namespace):
  c = pretrain_configs.get_config(args.preset)
  if args.batch_size is not None:
    c.train.batch_size = args.batch_size
  if args.seq_len is not None:
    c.data.seq_len = args.seq_len
    c.model.max_len = max(c.model.max_len, args.seq_len)
  if args.dtype is not None:
    c.model.dtype = args.dtype
  c.train.grad_accum_steps = 1
  c.mesh.shape = args.mesh
  check_config(c)  # the trainer's own checks: same errors for bad sizes
  return c


def synthetic_batch(rng: np.random.Generator, batch_size: int, seq_len: int,
                    vocab_size: int, data_config) -> dict[str, np.ndarray]:
  """Full rows of random regular tokens, masked with the trainer's RoBERTa recipe."""
  tokens = rng.integers(len(SPECIAL_IDS), vocab_size, size=(batch_size, seq_len))
  return mask_tokens(tokens, rng, vocab_size=vocab_size, mask_id=4, special_ids=SPECIAL_IDS,
                     mask_rate=data_config.mask_rate, mask_token_prob=data_config.mask_token_prob,
                     random_token_prob=data_config.random_token_prob)


def xla_flops(compiled) -> float | None:
  """FLOPs of one step from XLA's cost analysis of the compiled (per-device) program, times
  the number of devices; None when the backend reports none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  if not flops or flops <= 0:
    return None
  return float(flops) * jax.device_count()


def prepare_train(config) -> dict[str, Any]:
  """The trainer's model, sharded state and compiled train step, with synthetic batches on the
  devices; `run(state, i)` does step i and returns (state, metrics) without waiting."""
  m, d = config.model, config.data
  model = Encoder(encoder_config(m, vocab_size=d.vocab_size))
  mesh = partitioning.make_mesh(config.mesh.shape)
  tx = make_optimizer(config.train)
  state, shardings = create_sharded_state(init_params_fn(model, config), tx, mesh,
                                          jax.random.key(config.seed))
  replicated = NamedSharding(mesh, P())
  # The trainer's loss (tasks/mlm.py) and step, jitted with its shardings (train/loop.py).
  predictions = max_predictions(d.seq_len, d.mask_rate)
  step_fn = jax.jit(
      make_train_step(mlm_sums(model, predictions), tx, config.train.grad_accum_steps),
      in_shardings=(shardings, partitioning.batch_sharding(mesh), replicated),
      out_shardings=(shardings, replicated), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  rules = partitioning.LOGICAL_AXIS_RULES
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batches = [partitioning.global_batch(
        synthetic_batch(rng, config.train.batch_size, d.seq_len, d.vocab_size, d), mesh)
        for _ in range(NUM_DISTINCT_BATCHES)]
    dropout_rng = jax.random.key(config.seed + 1)
    t0 = time.perf_counter()
    lowered = step_fn.lower(state, batches[0], dropout_rng)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

  def run(state, i: int):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return compiled(state, batches[i % len(batches)], dropout_rng)

  return {'state': state, 'run': run, 'compiled': compiled, 'compile_s': compile_s,
          'batches': batches, 'lowered': lowered,
          'predictions': predictions,
          'num_params': sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))}


def time_train(config, num_steps: int) -> dict[str, Any]:
  m, d = config.model, config.data
  prepared = prepare_train(config)
  state, run, compiled = prepared['state'], prepared['run'], prepared['compiled']
  compile_s, predictions, num_params = (prepared['compile_s'], prepared['predictions'],
                                        prepared['num_params'])
  state, metrics = run(state, 0)  # warm-up: first-run allocations
  jax.device_get(metrics)
  times = []
  for i in range(num_steps):
    t0 = time.perf_counter()
    state, metrics = run(state, i + 1)
    metrics = jax.device_get(metrics)  # synchronise each step, as the trainer does
    times.append(time.perf_counter() - t0)
  if not np.isfinite(metrics['train_loss']):
    raise FloatingPointError(f'train_loss became {metrics["train_loss"]}; the numbers would '
                             'not mean anything.')
  tokens = config.train.batch_size * d.seq_len
  return {
      'num_params': num_params, 'tokens_per_step': tokens, 'compile_s': compile_s,
      'step_s_mean': statistics.fmean(times), 'step_s_median': statistics.median(times),
      'xla_flops_per_step': xla_flops(compiled),
      'analytic_flops_per_step': analytic_flops(
          state.params, m.num_layers, m.hidden, d.seq_len, tokens,
          config.train.batch_size * predictions),
      # The textbook 6*N*T (+ attention) with every parameter on every token, for reference.
      'naive_6nt_flops_per_step': (6.0 * num_params * tokens
                                   + 12.0 * m.num_layers * m.hidden * d.seq_len * tokens),
      'predictions_per_row': predictions,
  }


def pipeline_tokens_per_s(config, num_batches: int, workdir: str | None = None) -> float:
  """Tokens/s of ready host batches from the trainer's own pipeline (train/pretrain.py's
  iterator: tokenize, pack, mask, batch) for this process, with no step consuming them."""
  import tempfile
  from trainbig_jax.data import mlm, sources
  from trainbig_jax.data.tokenizer import train_or_load_tokenizer
  workdir = workdir or tempfile.mkdtemp(prefix='pipeline_bench_')
  config = config.copy_and_resolve_references()
  config.data.tokenizer_max_chars = min(config.data.tokenizer_max_chars, 4_000_000)
  sources.prepare(config.data.dataset, config.data.data_dir)
  tokenizer = train_or_load_tokenizer(config.data, workdir)
  batches = mlm.pretrain_train_iterator(config, tokenizer, process_index=jax.process_index(),
                                        process_count=jax.process_count())
  next(batches)  # opens the files, starts any workers
  tokens, t0 = 0, time.perf_counter()
  for _ in range(num_batches):
    tokens += next(batches)['inputs'].size
  return tokens / (time.perf_counter() - t0)


def _si(x: float | None, unit: str) -> str:
  if x is None:
    return 'n/a'
  for prefix, scale in (('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(x) >= scale:
      return f'{x / scale:.3g} {prefix}{unit}'
  return f'{x:.3g} {unit}'


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  config = build_config(args)
  devices = jax.devices()
  train = time_train(config, args.steps)
  step_s = train['step_s_median']
  on_cpu = devices[0].platform == 'cpu'
  n = args.matmul_size or (1024 if on_cpu else 4096)
  dtypes = ['float32'] + ([config.model.dtype] if config.model.dtype != 'float32' else [])
  matmul = {dt: matmul_flops_per_s(n, DTYPES[dt], args.matmul_reps) for dt in dtypes}
  reference = matmul[config.model.dtype]
  pipeline = (pipeline_tokens_per_s(config, args.pipeline_batches, args.pipeline_workdir)
              if args.pipeline_batches else None)
  xla_fs = train['xla_flops_per_step'] and train['xla_flops_per_step'] / step_s
  analytic_fs = train['analytic_flops_per_step'] / step_s
  result = {
      'preset': args.preset, 'layers': config.model.num_layers, 'hidden': config.model.hidden,
      'params': train['num_params'], 'batch_size': config.train.batch_size,
      'seq_len': config.data.seq_len, 'dtype': config.model.dtype,
      'mesh': list(partitioning.resolve_mesh_shape(config.mesh.shape, len(devices))),
      'device_kind': devices[0].device_kind, 'platform': devices[0].platform,
      'device_count': len(devices), 'process_count': jax.process_count(),
      'steps': args.steps, 'compile_s': train['compile_s'],
      'step_s_median': step_s, 'step_s_mean': train['step_s_mean'],
      'tokens_per_s': train['tokens_per_step'] / step_s,
      'xla_flops_per_step': train['xla_flops_per_step'],
      'analytic_flops_per_step': train['analytic_flops_per_step'],
      'naive_6nt_flops_per_step': train['naive_6nt_flops_per_step'],
      'predictions_per_row': train['predictions_per_row'],
      'xla_flops_per_s': xla_fs, 'analytic_flops_per_s': analytic_fs,
      'matmul_size': n, **{f'matmul_{dt}_flops_per_s': v for dt, v in matmul.items()},
      'mfu_proxy_analytic': analytic_fs / reference,
      'mfu_proxy_xla': xla_fs and xla_fs / reference,
      'pipeline_tokens_per_s_per_process': pipeline,
      'pipeline_over_step': pipeline and pipeline * jax.process_count() / (
          train['tokens_per_step'] / step_s),
  }
  rows = [
      ('device', f'{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), '
                 f'{jax.process_count()} process(es)'),
      ('model', f'{args.preset}: {config.model.num_layers} layers x {config.model.hidden}, '
                f'{train["num_params"] / 1e6:.2f} M params, {config.model.dtype}'),
      ('batch', f'{config.train.batch_size} x {config.data.seq_len} tokens, mesh '
                f'{tuple(result["mesh"])}'),
      ('compile', f'{train["compile_s"]:.1f} s'),
      ('step time', f'{step_s * 1e3:.1f} ms median, {train["step_s_mean"] * 1e3:.1f} ms mean '
                    f'over {args.steps} steps'),
      ('tokens/s', f'{result["tokens_per_s"]:,.0f}'),
      ('FLOPs/step (XLA)', _si(train['xla_flops_per_step'], 'FLOP')),
      ('FLOPs/step (analytic)', _si(train['analytic_flops_per_step'], 'FLOP')
       + f' (6NT+attn; head at {train["predictions_per_row"]} masked positions/row; '
         f'{_si(train["naive_6nt_flops_per_step"], "FLOP")} with logits everywhere)'),
      ('train FLOP/s (XLA)', _si(xla_fs, 'FLOP/s')),
      ('train FLOP/s (analytic)', _si(analytic_fs, 'FLOP/s')),
      *[(f'matmul {n}^2 {dt}', _si(v, 'FLOP/s')) for dt, v in matmul.items()],
      ('data pipeline alone', 'not measured (--pipeline_batches)' if pipeline is None else
       f'{pipeline:,.0f} tokens/s per process, {result["pipeline_over_step"]:.1f}x the step'),
      (f'MFU proxy vs {config.model.dtype} matmul',
       f'{result["mfu_proxy_analytic"]:.1%} analytic'
       + (f', {result["mfu_proxy_xla"]:.1%} XLA' if result['mfu_proxy_xla'] else '')),
  ]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f'{k:<{width}}  {v}')
  print(json.dumps(result))
  sys.stdout.flush()
  return result


if __name__ == '__main__':
  main()

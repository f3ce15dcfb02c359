"""A/B of the trainer's step: variants of one size compiled side by side, timed alternating.

  python benchmarks/ab_step.py --sizes=6x512 --rounds=5 \
      --variant=einsum:model.attention=einsum --variant=xla:model.attention=xla \
      [--variant='vec512:xla_cpu_prefer_vector_width=512']

Each --variant is NAME:KEY=VALUE[,KEY=VALUE...]; a KEY starting with 'model.' or 'train.'
overrides the config (the size flags are benchmarks/vs_pytorch.py's), any other KEY is an
XLA compiler option for that variant's compile (e.g. xla_cpu_enable_fast_math=true). The
variants share one train state; after a warm-up step each, they run in turn for --rounds
rounds, so load from other jobs falls on all of them alike. Prints the median step time of
each and its speed-up over the first variant, with the load average; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput  # noqa: E402
import vs_pytorch  # noqa: E402


def _value(text: str):
  for parse in (int, float):
    try:
      return parse(text)
    except ValueError:
      pass
  return {'true': True, 'false': False}.get(text.lower(), text)


def parse_variant(text: str) -> tuple[str, dict, dict]:
  name, _, spec = text.partition(':')
  overrides, options = {}, {}
  for item in filter(None, spec.split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'--variant={text!r}: {item!r} is not KEY=VALUE.')
    (overrides if key.startswith(('model.', 'train.')) else options)[key] = _value(value)
  return name, overrides, options


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variant', action='append', required=True)
  ours, rest = parser.parse_known_args(argv)
  args = vs_pytorch.parse_args(rest)
  size = args.sizes.split(',')[0]
  variants = [parse_variant(v) for v in ours.variant]
  runs, state = {}, None
  for name, overrides, options in variants:
    config = vs_pytorch.size_config(size, args)
    for key, value in overrides.items():
      section, field = key.split('.', 1)
      config[section][field] = value
    prepared = train_throughput.prepare_train(config)
    compiled = (prepared['lowered'].compile(compiler_options=options) if options
                else prepared['compiled'])
    state = state if state is not None else prepared['state']
    batches = prepared['batches']
    runs[name] = lambda s, i, c=compiled, b=batches: c(s, b[i % len(b)], jax.random.key(1))
  times = {name: [] for name in runs}
  for name, run in runs.items():  # warm-up
    state, metrics = run(state, 0)
    jax.device_get(metrics)
  for r in range(args.rounds):
    for name, run in runs.items():
      t0 = time.perf_counter()
      state, metrics = run(state, r)
      jax.device_get(metrics)
      times[name].append(time.perf_counter() - t0)
  first = statistics.median(times[variants[0][0]])
  print(f'{size}, batch {args.batch_size} x {args.seq_len}, {args.rounds} rounds, load '
        f'average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
  result = {'size': size, 'load': os.getloadavg()[0], 'variants': {}}
  for name, ts in times.items():
    median = statistics.median(ts)
    print(f'  {name:24s} {median * 1e3:9.1f} ms  {first / median:5.2f}x')
    result['variants'][name] = {'step_s_median': median, 'speedup': first / median,
                                'step_s': ts}
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()

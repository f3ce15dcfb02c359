"""A/B of the trainer's step: variants of one size compiled side by side, timed alternating.

  python benchmarks/ab_step.py --sizes=6x512 --rounds=5 \
      --variant=einsum:model.attention=einsum --variant=xla:model.attention=xla \
      [--variant='vec512:xla_cpu_prefer_vector_width=512']

Each --variant is NAME:KEY=VALUE[,KEY=VALUE...]; a KEY starting with 'model.' or 'train.'
overrides the config (the size flags are benchmarks/vs_pytorch.py's), any other KEY is an
XLA compiler option for that variant's compile (e.g. xla_cpu_enable_fast_math=true).
Variants with the same parameter tree share one train state (layers under nn.scan have
another tree than unrolled ones); after a warm-up step each, they run in turn for --rounds
rounds, so load from other jobs falls on all of them alike. Prints the median step time of
each, its speed-up over the first variant and its compiled peak memory per device (what XLA
allocates: arguments, temporaries, outputs not aliased to donated inputs; the figure that
decides a rematerialisation policy), with the load average; the last line is JSON. Where
the device reports its memory (GPU, TPU), a variant whose peak exceeds it is listed as
not fitting and not run.

vs_pytorch.py's --set applies to every variant before its own overrides:
  python benchmarks/ab_step.py --sizes=roberta_large --set=model.scan_layers=true \\
      --variant=none:model.remat=none --variant=full:model.remat=full
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

from trainbig_jax.train.memory import peak_bytes  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict, dict]:
  name, _, spec = text.partition(':')
  try:
    overrides, options = vs_pytorch.parse_settings(spec)
  except ValueError as e:
    raise ValueError(f'--variant={text!r}: {e}') from None
  return name, overrides, options


def device_bytes_limit() -> int | None:
  """What XLA may allocate on the first device (GPU, TPU); None where it reports no limit
  (CPU)."""
  return (jax.devices()[0].memory_stats() or {}).get('bytes_limit')


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variant', action='append', required=True)
  ours, rest = parser.parse_known_args(argv)
  args = vs_pytorch.parse_args(rest)
  size = args.sizes.split(',')[0]
  variants = [parse_variant(v) for v in ours.variant]
  # A variant whose compiled peak exceeds the device's memory is reported, not run (an
  # out-of-memory failure would lose the shared, donated state).
  limit = device_bytes_limit()
  runs, peaks, tree_of, states = {}, {}, {}, {}
  for name, overrides, options in variants:
    config = vs_pytorch.size_config(size, args, overrides)
    t0 = time.perf_counter()
    prepared = train_throughput.prepare_train(config)
    compiled = (prepared['lowered'].compile(compiler_options=options) if options
                else prepared['compiled'])
    peaks[name] = peak_bytes(compiled)
    tree_of[name] = jax.tree.structure(prepared['state'])
    states.setdefault(tree_of[name], prepared['state'])
    fits = limit is None or peaks[name] <= limit
    # As it goes: a run stopped by a time limit still shows what was compiled.
    print(f'{name}: state and step ready in {time.perf_counter() - t0:.1f} s, peak '
          f'{peaks[name] / 2 ** 30:.3f} GiB' + ('' if fits else ', does not fit'), flush=True)
    if not fits:
      continue
    batches = prepared['batches']
    runs[name] = lambda s, i, c=compiled, b=batches: c(s, b[i % len(b)], jax.random.key(1))
  prepared = None  # only one state per parameter tree stays on the device
  times = {name: [] for name in runs}

  def timed_step(name: str, i: int) -> float:
    t0 = time.perf_counter()
    states[tree_of[name]], metrics = runs[name](states[tree_of[name]], i)
    jax.device_get(metrics)
    return time.perf_counter() - t0

  for name in runs:  # warm-up
    timed_step(name, 0)
  for r in range(args.rounds):
    for name in runs:
      times[name].append(timed_step(name, r))
  first = statistics.median(next(iter(times.values()))) if times else float('nan')
  print(f'{size}, batch {args.batch_size} x {args.seq_len}, {args.rounds} rounds, load '
        f'average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores'
        + (f', device memory {limit / 2 ** 30:.1f} GiB' if limit else ''))
  result = {'size': size, 'load': os.getloadavg()[0], 'bytes_limit': limit, 'variants': {}}
  for name, _, _ in variants:
    peak = f'peak {peaks[name] / 2 ** 30:7.3f} GiB'
    if name not in times:
      print(f'  {name:24s} does not fit: {peak}')
      result['variants'][name] = {'fits': False, 'peak_bytes': peaks[name]}
      continue
    median = statistics.median(times[name])
    print(f'  {name:24s} {median * 1e3:9.1f} ms  {first / median:5.2f}x  {peak}')
    result['variants'][name] = {'fits': True, 'step_s_median': median,
                                'speedup': first / median, 'step_s': times[name],
                                'peak_bytes': peaks[name]}
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()

"""Where the train step's time goes: per-op times from a jax profiler trace, named by HLO.

  python benchmarks/profile_step.py --sizes=6x512 [--steps=2] [--top=25] [--attention=xla]

Builds the same step as benchmarks/vs_pytorch.py (the trainer's own step on synthetic
batches, same size flags), runs it twice to warm up, traces --steps steps with
`jax.profiler.trace` (Perfetto JSON), and sums the duration of every executed XLA op. Each
op is looked up in the compiled HLO for its shape and the jax source it came from (the
`op_name` metadata), then grouped: matmuls (dot / YNNPACK / oneDNN fusions), the
vocabulary projection and loss, the optimizer update, and the rest. Times are per step, as
seen by the op's thread (ops on different threads overlap, so shares are of summed op time).

One blind spot: a plain HLO `dot` (XLA CPU's Eigen path, for contractions YNNPACK does not
take, such as a Dense kernel's gradient x^T @ dy) is traced as its launch only, a few ms; its
work runs on the thread pool beside the ops that follow, which then look up to twice as slow
as they are. Such dots are listed with their launch time and counted in a note; each top
op's overlap with other traced ops is printed beside it.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput  # noqa: E402
import vs_pytorch  # noqa: E402

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?(?:op_name="([^"]*)")?')


def hlo_index(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (result shape, jax op_name metadata)."""
  index = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      op_name = re.search(r'op_name="([^"]*)"', line)
      index[m.group(1)] = (m.group(2), op_name.group(1) if op_name else '')
  return index


def plain_dots(hlo_text: str) -> set[str]:
  """Names of the HLO `dot` instructions. A dot inside a fusion is never traced under its own
  name, so the traced ones among these are the unfused dots: the Eigen path."""
  return set(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = \S+ dot\(', hlo_text, re.M))


def overlapped_share(span: tuple[float, float], others: list[tuple[float, float]]) -> float:
  """The share of `span` (start, end) during which at least one of `others` also ran."""
  start, end = span
  cuts = sorted((max(s, start), min(e, end)) for s, e in others if s < end and e > start)
  covered, reach = 0.0, start
  for s, e in cuts:
    covered += max(0.0, e - max(s, reach))
    reach = max(reach, e)
  return covered / (end - start) if end > start else 0.0


def group_of(name: str, op_name: str) -> str:
  if 'dot' in name or 'ynn' in name or 'onednn' in name or 'matmul' in name:
    kind = 'matmul'
  else:
    kind = 'other'
  if 'mlm_head' in op_name or 'softmax_cross_entropy' in op_name or 'embed' in op_name:
    return f'{kind}: embeddings, MLM head, loss'
  if 'attention' in op_name:
    return f'{kind}: attention block'
  if 'mlp' in op_name:
    return f'{kind}: MLP block'
  if any(s in op_name for s in ('adam', 'optax', 'clip', 'apply_updates', 'norm(')):
    return f'{kind}: optimizer'
  return f'{kind}: rest'


def main(argv: list[str] | None = None) -> None:
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--top', type=int, default=25)
  ours, rest = parser.parse_known_args(argv)
  args = vs_pytorch.parse_args(rest)
  config = vs_pytorch.size_config(args.sizes.split(',')[0], args)
  prepared = train_throughput.prepare_train(config)
  state, run = prepared['state'], prepared['run']
  hlo_text = prepared['compiled'].as_text()
  index = hlo_index(hlo_text)
  eigen_dots = plain_dots(hlo_text)
  for i in range(2):
    state, metrics = run(state, i)
    jax.device_get(metrics)
  with tempfile.TemporaryDirectory() as out:
    with jax.profiler.trace(out, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for i in range(ours.steps):
        state, metrics = run(state, i)
        jax.device_get(metrics)
      wall_ms = (time.perf_counter() - t0) * 1e3 / ours.steps
    trace_file = glob.glob(f'{out}/**/*.trace.json.gz', recursive=True)[0]
    trace = json.load(gzip.open(trace_file))
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  per_op, spans = collections.Counter(), collections.defaultdict(list)
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in index:
      per_op[e['name']] += e['dur'] / 1e3 / ours.steps  # ms per step
      spans[e['name']].append((e['ts'], e['ts'] + e['dur']))
  all_spans = [(span, name) for name, ss in spans.items() for span in ss]
  total = sum(per_op.values())
  groups = collections.Counter()
  for name, ms in per_op.items():
    groups[group_of(name, index[name][1])] += ms
  print(f'{config.preset}: {config.model.num_layers} x {config.model.hidden}, batch '
        f'{config.train.batch_size} x {config.data.seq_len}, attention '
        f'{config.model.get("attention", "einsum")}; summed op time {total:.0f} ms/step, '
        f'wall {wall_ms:.0f} ms/step')
  for g, ms in groups.most_common():
    print(f'  {ms:9.1f} ms  {ms / total:5.1%}  {g}')
  print(f'top {ours.top} ops (overlap: share of the op\'s time another traced op also ran):')
  for name, ms in per_op.most_common(ours.top):
    shape, op_name = index[name]
    launch = ' (launch only)' if name in eigen_dots else ''
    overlap = sum(overlapped_share(span, [o for o, other in all_spans if other != name])
                  for span in spans[name]) / len(spans[name])
    print(f'  {ms:9.1f} ms  {ms / total:5.1%}  overlap {overlap:4.0%}  {name + launch:32s} '
          f'{shape:28s} {op_name[-90:]}')
  traced = [name for name in per_op if name in eigen_dots]
  if traced:
    print(f'note: {len(traced)} plain `dot` ops (the Eigen path) are traced as their launch '
          f'only ({sum(per_op[n] for n in traced):.1f} ms/step in all); their work overlaps '
          f'the ops traced after them, which then look slower than they are.')


if __name__ == '__main__':
  main()

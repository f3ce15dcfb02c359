"""trainbig_jax's train step side by side with PyTorch `transformers` on the same machine.

  python benchmarks/vs_pytorch.py [--sizes=3x128,6x256,6x512,12x768] [--rounds=3]
      [--steps=2] [--seq_len=128] [--batch_size=32] [--vocab_size=8000] [--attention=...]
      [--set=model.scan_layers=true,model.remat=full]   # any model./train. fields of the jax side
  python benchmarks/vs_pytorch.py --tiny     # seconds; what the test suite runs

The same RoBERTa-style MLM model (post-LN, FFN 4x, 64-wide heads, learned positions, tied
output embedding, dropout off, 15% of tokens predicted, AdamW with global-norm clipping) is
trained by:
  jax    trainbig_jax's own builders: the encoder, sharded state, optimizer and jitted train
         step of `trainbig train` (through benchmarks/train_throughput.prepare_train);
  torch  `transformers.RobertaForMaskedLM` with torch.optim.AdamW (foreach; fused on a GPU),
         labels -100 outside the masked positions, on the same synthetic batches. On a GPU it
         runs under bf16 autocast with SDPA attention; on a CPU in fp32 with SDPA, using the
         same number of threads as XLA (all cores).
After one warm-up step each, the two alternate in rounds of --steps steps, each step
synchronised, so that load from other jobs falls on both; tokens/s is the median over the
timed steps. Each side's FLOP/s is the analytic count of the work it does (6 x params x
tokens + attention; the trainer computes the vocabulary projection at the masked positions
only, `transformers` at every position), given as a share of the best of a jitted N x N
matmul (jax) and torch.matmul measured in the same run, beside the share jax's whole step
would need to reach the target ratio (1.2x on a CPU, 1.3x on a GPU): above about 90% the
target asks for the whole step, elementwise work included, at nearly the matmul rate. On a
GPU the default sizes are roberta_base and roberta_large at sequence 512 with bf16
activations and cuDNN attention where available. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Both libraries share one GPU in this process: JAX would preallocate 75% of its memory and
# leave PyTorch too little for roberta_large (about 35-40 GB at batch 32 x 512 in bf16
# autocast, by its activations, logits and AdamW state). So JAX allocates as it needs, up
# to half the memory. Read when JAX's backend starts, so this also holds for ab_step.py,
# which imports this module first; a user's settings win.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput  # noqa: E402  (the trainer's step, batches and FLOP counts)

from trainbig_jax.configs import pretrain as pretrain_configs  # noqa: E402
from trainbig_jax.tasks.mlm import check_config  # noqa: E402

CPU_SIZES = '3x128,6x256,6x512,12x768'
GPU_SIZES = 'roberta_base,roberta_large'
# The CPU and GPU targets for jax's tokens/s over the PyTorch peer's.
TARGET_RATIO = {'cpu': 1.2, 'gpu': 1.3}
TINY = dict(sizes='1x32', seq_len=16, batch_size=8, vocab_size=128, rounds=1, steps=1,
            matmul_size=128)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', default=None,
                      help=f'LAYERSxHIDDEN or preset names, comma-separated; default '
                           f'{CPU_SIZES} on CPU, {GPU_SIZES} on GPU')
  parser.add_argument('--seq_len', type=int, default=None, help='default 128 CPU, 512 GPU')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--vocab_size', type=int, default=None, help='default 8000 CPU, 50265 GPU')
  parser.add_argument('--rounds', type=int, default=3, help='alternating rounds')
  parser.add_argument('--steps', type=int, default=2, help='timed steps per side per round')
  parser.add_argument('--dtype', default=None, choices=['float32', 'bfloat16'],
                      help='activations (parameters stay fp32); default fp32 CPU, bf16 GPU')
  parser.add_argument('--attention', default=None,
                      help='model.attention of the jax side; default: the config default')
  parser.add_argument('--set', default='', metavar='KEY=VALUE[,KEY=VALUE...]',
                      help="model.* or train.* fields of the jax side's config, e.g. "
                           'model.scan_layers=true,model.remat=full')
  parser.add_argument('--matmul_size', type=int, default=None, help='default 1024 CPU, 8192 GPU')
  parser.add_argument('--tiny', action='store_true', help='a seconds-long smoke run')
  args = parser.parse_args(argv)
  if args.tiny:
    for k, v in TINY.items():
      setattr(args, k, v)
  gpu = jax.devices()[0].platform == 'gpu'
  args.gpu = gpu
  args.sizes = args.sizes or (GPU_SIZES if gpu else CPU_SIZES)
  args.seq_len = args.seq_len or (512 if gpu else 128)
  args.vocab_size = args.vocab_size or (50265 if gpu else 8000)
  args.dtype = args.dtype or ('bfloat16' if gpu else 'float32')
  args.matmul_size = args.matmul_size or (8192 if gpu else 1024)
  if args.rounds < 1 or args.steps < 1:
    parser.error(f'--rounds={args.rounds} and --steps={args.steps} must be at least 1.')
  try:
    args.overrides, options = parse_settings(args.set)
  except ValueError as e:
    parser.error(str(e))
  if options:
    parser.error(f'--set={args.set!r}: {", ".join(options)} are not model.* or train.* fields.')
  return args


def _value(text: str):
  for parse in (int, float):
    try:
      return parse(text)
    except ValueError:
      pass
  return {'true': True, 'false': False}.get(text.lower(), text)


def parse_settings(spec: str) -> tuple[dict, dict]:
  """'KEY=VALUE,...' -> (config overrides: the model.* and train.* keys, other keys: XLA
  compiler options); values parsed as int, float, true/false or left as text."""
  overrides, options = {}, {}
  for item in filter(None, spec.split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'{item!r} in {spec!r} is not KEY=VALUE.')
    (overrides if key.startswith(('model.', 'train.')) else options)[key] = _value(value)
  return overrides, options


def apply_overrides(config, overrides: dict) -> None:
  """Sets 'section.field' values in `config`; a field the config lacks is an error."""
  for key, value in overrides.items():
    section, field = key.split('.', 1)
    if field not in config[section]:
      raise ValueError(f'{key}={value!r}: config.{section} has no field {field!r}; it has '
                       f'{", ".join(sorted(config[section]))}.')
    config[section][field] = value


def size_config(size: str, args: argparse.Namespace, overrides: dict | None = None):
  """A pretraining config for one size: 'LxH' (heads of 64, FFN 4x) or a preset name, with
  --set's overrides and then `overrides` applied."""
  if 'x' in size and size.replace('x', '').isdigit():
    layers, hidden = (int(s) for s in size.split('x'))
    c = pretrain_configs.set_size(pretrain_configs.base_config(), layers, hidden)
    c.preset = size
  else:
    c = pretrain_configs.get_config(size)
  c.data.seq_len, c.data.vocab_size = args.seq_len, args.vocab_size
  c.model.max_len = args.seq_len + 2  # as the peer's position table
  c.model.dropout = c.model.attention_dropout = 0.0
  c.model.dtype = args.dtype
  if args.attention is not None:
    c.model.attention = args.attention
  c.train.batch_size, c.train.grad_accum_steps = args.batch_size, 1
  c.mesh.shape = (-1, 1, 1)
  apply_overrides(c, {**args.overrides, **(overrides or {})})
  check_config(c)
  return c


class TorchPeer:
  """RobertaForMaskedLM + AdamW on the jax side's batches; `step(i)` runs one synchronised
  optimizer step."""

  def __init__(self, config, batches: list[dict[str, np.ndarray]], gpu: bool):
    import torch
    import transformers
    m, d, t = config.model, config.data, config.train
    self.torch, self.gpu = torch, gpu
    self.device = torch.device('cuda' if gpu else 'cpu')
    hf_config = transformers.RobertaConfig(
        vocab_size=d.vocab_size, hidden_size=m.hidden, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
        max_position_embeddings=d.seq_len + 2,  # RoBERTa positions start after pad_id
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        layer_norm_eps=m.layer_norm_eps, tie_word_embeddings=True,
        type_vocab_size=1)  # one token-type row, added to every token: the only extra
    torch.manual_seed(0)
    self.model = transformers.RobertaForMaskedLM._from_config(
        hf_config, attn_implementation='sdpa').to(self.device)
    self.model.train()
    decay, no_decay = [], []
    for name, p in self.model.named_parameters():
      (no_decay if name.endswith('bias') or 'LayerNorm' in name else decay).append(p)
    self.optimizer = torch.optim.AdamW(
        [{'params': decay, 'weight_decay': t.weight_decay},
         {'params': no_decay, 'weight_decay': 0.0}],
        lr=t.learning_rate, betas=(t.b1, t.b2), eps=t.eps,
        **({'fused': True} if gpu else {'foreach': True}))
    self.grad_clip = t.grad_clip
    self.batches = []
    for b in batches:
      labels = np.where(b['weights'] > 0, b['targets'], -100)
      self.batches.append({
          'input_ids': torch.tensor(b['inputs'], dtype=torch.long, device=self.device),
          'attention_mask': torch.tensor(b['inputs'] != 0, dtype=torch.long,
                                         device=self.device),
          'labels': torch.as_tensor(labels, dtype=torch.long, device=self.device)})
    self.num_params = sum(p.numel() for p in self.model.parameters())

  def step(self, i: int) -> float:
    torch = self.torch
    batch = self.batches[i % len(self.batches)]
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.gpu):
      loss = self.model(**batch).loss
    loss.backward()
    if self.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    value = float(loss.detach())  # synchronises, as the jax side's device_get does
    if self.gpu:
      torch.cuda.synchronize()
    return value


def torch_matmul_flops_per_s(n: int, gpu: bool, seconds: float = 2.0) -> float:
  import torch
  device = 'cuda' if gpu else 'cpu'
  dtype = torch.bfloat16 if gpu else torch.float32
  a = torch.randn(n, n, device=device, dtype=dtype)
  b = torch.randn(n, n, device=device, dtype=dtype) / n ** 0.5
  x = a @ b  # warm-up
  def sync():
    if gpu:
      torch.cuda.synchronize()
  sync()
  t0 = time.perf_counter()
  x = a @ b
  sync()
  reps = int(np.clip(seconds / max(time.perf_counter() - t0, 1e-6), 3, 200))
  t0 = time.perf_counter()
  for _ in range(reps):
    x = x @ b
  sync()
  return 2.0 * n ** 3 * reps / (time.perf_counter() - t0)


def compare(config, args: argparse.Namespace) -> dict[str, Any]:
  """Both trainers on one size, alternating; tokens/s, analytic FLOP/s and losses."""
  prepared = train_throughput.prepare_train(config)
  state, run = prepared['state'], prepared['run']
  host_batches = [jax.device_get(b) for b in prepared['batches']]
  peer = TorchPeer(config, host_batches, args.gpu)
  state, metrics = run(state, 0)  # warm-up both
  jax.device_get(metrics)
  peer.step(0)
  jax_times, torch_times = [], []
  step = 1
  for _ in range(args.rounds):
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, metrics = run(state, step)
      metrics = jax.device_get(metrics)
      jax_times.append(time.perf_counter() - t0)
      step += 1
    for _ in range(args.steps):
      t0 = time.perf_counter()
      torch_loss = peer.step(step)
      torch_times.append(time.perf_counter() - t0)
      step += 1
  d = config.data
  tokens = config.train.batch_size * d.seq_len
  count = lambda predicted: train_throughput.analytic_flops(
      state.params, config.model.num_layers, config.model.hidden, d.seq_len, tokens, predicted)
  jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
  for name, loss in (('jax', metrics['train_loss']), ('torch', torch_loss)):
    if not np.isfinite(loss):
      raise FloatingPointError(f'The {name} side\'s loss became {loss}.')
  return {
      'size': config.preset, 'layers': config.model.num_layers, 'hidden': config.model.hidden,
      'params_jax': prepared['num_params'], 'params_torch': peer.num_params,
      'compile_s': prepared['compile_s'],
      'jax_step_s': jax_s, 'torch_step_s': torch_s,
      'jax_tokens_per_s': tokens / jax_s, 'torch_tokens_per_s': tokens / torch_s,
      'ratio': torch_s / jax_s,
      'jax_flops_per_s': count(config.train.batch_size * prepared['predictions']) / jax_s,
      'torch_flops_per_s': count(tokens) / torch_s,  # logits at every position
      'jax_loss': float(metrics['train_loss']), 'torch_loss': torch_loss,
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  import torch
  if not args.gpu:
    torch.set_num_threads(os.cpu_count() or 1)  # XLA's CPU client uses every core
  device = jax.devices()[0]
  load_before = os.getloadavg()
  rows = []
  for size in args.sizes.split(','):
    rows.append(compare(size_config(size, args), args))
    r = rows[-1]
    print(f'{size}: jax {r["jax_tokens_per_s"]:,.0f} tokens/s, torch '
          f'{r["torch_tokens_per_s"]:,.0f} tokens/s, {r["ratio"]:.2f}x; load average '
          f'{os.getloadavg()[0]:.1f}', flush=True)
  mm_dtype = train_throughput.DTYPES[args.dtype]
  matmul_jax = train_throughput.matmul_flops_per_s(args.matmul_size, mm_dtype)
  matmul_torch = torch_matmul_flops_per_s(args.matmul_size, args.gpu)
  reference = max(matmul_jax, matmul_torch)
  target = TARGET_RATIO['gpu' if args.gpu else 'cpu']
  for r in rows:
    r['jax_matmul_share'] = r['jax_flops_per_s'] / reference
    r['torch_matmul_share'] = r['torch_flops_per_s'] / reference
    # The share of the matmul rate jax's whole step would need to reach the target ratio:
    # its FLOP count is fixed, so the share scales with its speed.
    r['jax_share_for_target'] = r['jax_matmul_share'] * target / r['ratio']
  load_after = os.getloadavg()
  print(f'device: {device.device_kind} ({device.platform}), torch threads '
        f'{torch.get_num_threads()}, jax {jax.__version__}, torch {torch.__version__}, '
        f'{args.dtype}, batch {args.batch_size} x seq {args.seq_len}, vocab {args.vocab_size}'
        + (f', jax side with {args.set}' if args.set else ''))
  print(f'matmul {args.matmul_size}^2 {args.dtype}: jax {matmul_jax / 1e9:.1f} GFLOP/s, '
        f'torch {matmul_torch / 1e9:.1f} GFLOP/s; load average {load_before[0]:.1f} -> '
        f'{load_after[0]:.1f} on {os.cpu_count()} cores')
  header = ('size', 'params', 'jax tok/s', 'torch tok/s', 'ratio', 'jax GFLOP/s (share)',
            'torch GFLOP/s (share)', f'jax share needed for {target}x')
  print('| ' + ' | '.join(header) + ' |')
  print('|' + ' --- |' * len(header))
  for r in rows:
    print(f'| {r["size"]} | {r["params_jax"] / 1e6:.2f} M | {r["jax_tokens_per_s"]:,.0f} | '
          f'{r["torch_tokens_per_s"]:,.0f} | {r["ratio"]:.2f}x | '
          f'{r["jax_flops_per_s"] / 1e9:.1f} ({r["jax_matmul_share"]:.0%}) | '
          f'{r["torch_flops_per_s"] / 1e9:.1f} ({r["torch_matmul_share"]:.0%}) | '
          f'{r["jax_share_for_target"]:.0%} |')
  result = {'device_kind': device.device_kind, 'platform': device.platform,
            'torch_threads': torch.get_num_threads(), 'dtype': args.dtype,
            'batch_size': args.batch_size, 'seq_len': args.seq_len,
            'vocab_size': args.vocab_size, 'rounds': args.rounds, 'steps': args.steps,
            'set': args.set, 'matmul_size': args.matmul_size, 'matmul_jax_flops_per_s': matmul_jax,
            'matmul_torch_flops_per_s': matmul_torch, 'load_before': load_before[0],
            'load_after': load_after[0], 'target_ratio': target, 'sizes': rows}
  print(json.dumps(result))
  sys.stdout.flush()
  return result


if __name__ == '__main__':
  main()

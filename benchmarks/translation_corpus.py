"""Statistics of a translation corpus and the cost of its data pipeline.

Prints: the time to prepare the corpus (wall and CPU seconds; from nothing unless --data_dir
names a folder where it is already prepared), pairs per split, the Debian package versions
(embedded corpus), token lengths under a shared tokenizer trained as a run would train it,
the share of pairs truncated at --max_len, BLEU/chrF of copying the source (the floor a model
must beat), and the CPU cost of packed training batches.

  python benchmarks/translation_corpus.py                       # embedded corpus, from nothing
  python benchmarks/translation_corpus.py --data_dir=DIR --vocab_size=8000 --max_len=64
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ml_collections
import numpy as np

from trainbig_jax.data import sources, translation
from trainbig_jax.data.tokenizer import train_or_load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--dataset', default='trainbig_libreoffice_enfr')
  parser.add_argument('--data_dir', default=None,
                      help='data folder (default: a new temporary one, so preparing is timed)')
  parser.add_argument('--vocab_size', type=int, default=4000)
  parser.add_argument('--tokenizer_max_chars', type=int, default=5_000_000)
  parser.add_argument('--max_len', type=int, default=48, help='max_source_len = max_target_len')
  parser.add_argument('--pack_len', type=int, default=96)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--batches', type=int, default=100, help='packed batches to time')
  return parser.parse_args(argv)


def _timed(fn):
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn()
  return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or os.path.join(tmp, 'tfds')
    print(f'load average (1 min) at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs')
    builder, wall, cpu = _timed(lambda: sources.prepare(args.dataset, data_dir))
    print(f'prepare: {wall:.1f} s wall, {cpu:.1f} s CPU (this process; apt-get and dpkg-deb '
          f'run as children)')
    for name, split in sorted(builder.info.splits.items()):
      print(f'  {name}: {split.num_examples:,} pairs')
    for key, value in sorted(builder.info.metadata.items()):
      print(f'  {key}: {value}')

    config = ml_collections.ConfigDict()
    config.data = translation.translation_data_config()
    config.data.update(dict(dataset=args.dataset, data_dir=data_dir,
                            vocab_size=args.vocab_size,
                            tokenizer_max_chars=args.tokenizer_max_chars,
                            max_source_len=args.max_len, max_target_len=args.max_len,
                            pack_len=args.pack_len))
    config.train = ml_collections.ConfigDict({'batch_size': args.batch_size})
    tokenizer, wall, cpu = _timed(lambda: train_or_load_tokenizer(config.data, tmp))
    print(f'tokenizer (vocab {args.vocab_size}, both languages): {wall:.1f} s wall, '
          f'{cpu:.1f} s CPU')

    pairs = translation.translation_pairs(config, config.data.train_split)
    for lang, side in ((config.data.source_lang, 0), (config.data.target_lang, 1)):
      lengths = np.array([len(ids) + 1 for ids in tokenizer.encode_batch(
          [pair[side] for pair in pairs])])  # + eos
      p50, p95, p99 = np.percentile(lengths, [50, 95, 99])
      print(f'train {lang} tokens (eos included): mean {lengths.mean():.1f}, median {p50:.0f}, '
            f'p95 {p95:.0f}, p99 {p99:.0f}, max {lengths.max()}; truncated at {args.max_len}: '
            f'{np.mean(lengths > args.max_len):.1%}')
    for split in ('validation', 'test'):
      if split in builder.info.splits:
        scores = translation.copy_source_scores(config, split)
        print(f'copy the source, {split}: BLEU {scores["bleu"]:.1f}, chrF {scores["chrf"]:.1f}')

    iterator = translation.translation_train_iterator(config, tokenizer)
    next(iterator)  # start-up (threads, first reads) is not timed
    batches, wall, cpu = _timed(lambda: [next(iterator) for _ in range(args.batches)])
    per_row = np.mean([b['inputs_segmentation'].max(axis=1).mean() for b in batches])
    fill = [np.mean([(b[k] != 0).mean() for b in batches]) for k in ('inputs', 'targets')]
    print(f'packed batches {args.batch_size} x {args.pack_len}: {1000 * wall / args.batches:.0f} '
          f'ms wall, {1000 * cpu / args.batches:.0f} ms CPU each; {per_row:.2f} pairs per row, '
          f'non-pad tokens {fill[0]:.0%} (sources) / {fill[1]:.0%} (targets); one epoch = '
          f'{len(pairs) / (per_row * args.batch_size):.0f} batches')


if __name__ == '__main__':
  main()

"""Sweep presets: model sizes under one training budget, then fine-tuning and compression.

Usage: trainbig sweep --config=configs/sweep.py:PRESET --workdir=DIR
       [--config.pretrain_budget_s=600 --config.sizes='((3, 768), (6, 768))' ...]
       [--config.seeds=3] [--config.budget=flops --config.pretrain_budget_flops=1e15]

The budget is `budget='time'` (pretrain_budget_s seconds of training, the paper's measure and
the default), 'flops' (pretrain_budget_flops analytic training FLOPs) or 'tokens'
(pretrain_budget_tokens); FLOPs and tokens give the same runs on any machine. `seeds=N` runs
every cell N times with different initialisation, data order and masking.

Each size is (layers, hidden); heads = max(1, hidden // 64) unless `heads` is given, and the
MLP is 4 x hidden wide. Every size is pretrained for the same `pretrain_budget_s` seconds of
training time (measured by the trainer, evaluation excluded), fine-tuned on `finetune_preset`,
then compressed at every sparsity and bit width of the grids and evaluated.

Presets:
  demo    3 sizes on the embedded corpora; about 9 minutes on 2 CPU cores.
  translate_demo  2 translation sizes (encoder-decoders, En->Fr on the embedded corpus)
          trained for the same time, compressed and decided on BLEU.
  tiny    2 sizes, seconds each; for tests.
  gpu     4 sizes from 6 x 256 to 12 x 768, seq 128, 50 s of pretraining each, fine-tuned
          and compressed: the study for one H100/H200 in under 10 minutes (estimated, not
          yet run on a GPU; docs/gpu/README.md).
  depth   the paper's depth grid (3..24 layers at hidden 768), RoBERTa settings, MNLI.
  width   the paper's width grid (hidden 256..1536 at 6 layers), RoBERTa settings, MNLI.
"""

import ml_collections

from trainbig_jax.configs import compress, pretrain


def get_config(preset: str = 'demo') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.sizes = ((2, 64), (4, 128))
  c.heads = 0  # 0: hidden // 64 (at least 1)
  # 'classify': MLM pretraining (configs/pretrain.py presets), then classification
  # fine-tuning whose accuracy decides; 'translate': translation training (configs/translate.py
  # presets), whose BLEU decides, with no fine-tuning stage.
  c.task_kind = 'classify'
  c.pretrain_preset = 'demo'
  c.pretrain_budget_s = 60.0
  c.budget = 'time'  # 'time' | 'flops' | 'tokens': which pretraining budget stops each size
  c.pretrain_budget_flops = 0.0  # used when budget='flops'
  c.pretrain_budget_tokens = 0.0  # used when budget='tokens'
  c.seeds = 1  # runs per cell (seed k adds k to the pretraining and fine-tuning seeds)
  # Common schedule horizon: with a wall-clock budget far below it, every size trains at the
  # same (warmed-up, slowly decaying) learning rate, so sizes differ only in speed and capacity.
  c.pretrain_total_steps = 100_000
  c.pretrain_overrides = ml_collections.ConfigDict()  # e.g. {'train': {'batch_size': 64}}
  c.finetune_preset = 'demo'
  c.finetune_overrides = ml_collections.ConfigDict()
  c.sparsities = (0.3, 0.5, 0.7, 0.9)
  c.bits = (8, 6, 4, 3, 2)
  c.prune_quantize = ((0.5, 4),)  # (sparsity, bits) pairs compressed both ways
  c.compress_preset = 'dense'  # base compression settings (scope, granularity, patterns)
  # Quantize the token embedding with the layer kernels. Small models are mostly embedding,
  # so without it every quantized cell of a small model would still be stored mostly in
  # fp32 and sizes could not be compared across models at equal stored bytes (claim 3).
  c.quantize_embeddings = True

  if preset == 'demo':
    c.sizes = ((1, 32), (2, 64), (3, 96))
    c.heads = 0
    c.pretrain_budget_s = 100.0
    # Machine-independent budgets (--config.budget=flops|tokens): about what the 2 x 64 model
    # trains in the 100 s above on the 2-core machine (docs/demo/results.jsonl: 2.43e12
    # analytic training FLOPs, 2.94e6 tokens).
    c.pretrain_budget_flops = 2.4e12
    c.pretrain_budget_tokens = 3e6
    # The demo pretrain preset's 2e-3 with 50 warmup steps leaves the 3 x 96 model stuck at
    # unigram loss (6.5 after 100 s, measured); 1e-3 with 300 warmup steps trains all three.
    c.pretrain_overrides = ml_collections.ConfigDict(
        {'train': {'learning_rate': 1e-3, 'warmup_steps': 300}})
    # Every size gets the same fine-tuning steps (the paper fine-tunes each model fully).
    c.finetune_overrides = ml_collections.ConfigDict(
        {'train': {'budget_s': 0.0, 'total_steps': 300, 'eval_every': 100}})
  elif preset == 'tiny':
    c.sizes = ((1, 32), (2, 64))
    c.pretrain_preset = 'tiny'
    c.pretrain_budget_s = 3.0
    c.pretrain_total_steps = 30
    c.finetune_overrides = ml_collections.ConfigDict(
        {'train': {'total_steps': 20, 'budget_s': 3.0, 'eval_every': 10, 'warmup_steps': 2},
         'max_len': 32})
    c.sparsities = (0.5, 0.9)
    c.bits = (8, 4)
    # About 5 steps of the larger size, 28 of the smaller (--config.budget=flops).
    c.pretrain_budget_flops = 1.5e9
    c.pretrain_budget_tokens = 10_000.0
  elif preset == 'translate_demo':
    c.task_kind = 'translate'
    c.sizes = ((1, 64), (2, 128))
    c.pretrain_budget_s = 150.0
    c.pretrain_overrides = ml_collections.ConfigDict({'data': {'eval_examples': 100}})
    c.sparsities = (0.5, 0.9)
    c.bits = (8, 4)
  elif preset == 'translate_tiny':  # for tests
    c.task_kind = 'translate'
    c.sizes = ((1, 32), (1, 48))
    c.pretrain_preset = 'tiny'
    c.pretrain_budget_s = 3.0
    c.pretrain_total_steps = 12
    c.pretrain_overrides = ml_collections.ConfigDict({'data': {'eval_examples': 8}})
    c.sparsities = (0.5,)
    c.bits = (8,)
    c.prune_quantize = ()
  elif preset == 'gpu':
    # One H100/H200, under 10 minutes in all (an estimate; not yet run on a GPU): 4 sizes x
    # (50 s pretraining + compilation + 600 fine-tuning steps + 8 evaluated cells).
    c.sizes = ((6, 256), (6, 512), (6, 768), (12, 768))
    c.pretrain_preset = 'demo'
    c.pretrain_budget_s = 50.0
    c.pretrain_budget_flops = 1e16  # --config.budget=flops: ~25 s of 12 x 768 at 400 TFLOP/s
    c.pretrain_budget_tokens = 5e7  # --config.budget=tokens
    c.pretrain_overrides = ml_collections.ConfigDict({
        'model': {'max_len': 130, 'dtype': 'bfloat16'},
        'data': {'seq_len': 128, 'vocab_size': 8192, 'num_eval_batches': 8},
        'train': {'batch_size': 128, 'learning_rate': 5e-4, 'warmup_steps': 500,
                  'log_every': 100, 'checkpoint_every': 5000}})
    c.finetune_overrides = ml_collections.ConfigDict(
        {'train': {'budget_s': 0.0, 'total_steps': 600, 'eval_every': 200}})
    c.sparsities = (0.5, 0.9)
    c.bits = (8, 4, 2)
  elif preset in ('depth', 'width'):
    grid = pretrain.DEPTH_GRID if preset == 'depth' else pretrain.WIDTH_GRID
    c.sizes = (tuple((d, 768) for d in grid) if preset == 'depth' else
               tuple((pretrain.WIDTH_GRID_LAYERS, w) for w in grid))
    c.pretrain_preset = 'roberta_base'
    c.pretrain_budget_s = 24 * 3600.0
    c.finetune_preset = 'mnli'
    c.sparsities = tuple(s / 100 for s in compress.SPARSITY_GRID if s)
    c.bits = compress.BITS_GRID
    c.prune_quantize = ((0.5, 8), (0.5, 4), (0.7, 4))
  else:
    raise ValueError(f'Unknown sweep preset {preset!r}; allowed: demo, tiny, translate_demo, '
                     f'translate_tiny, gpu, depth, width.')
  return c

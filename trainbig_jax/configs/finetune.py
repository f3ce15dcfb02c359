"""Fine-tuning presets: a pretrained encoder plus a classification head.

Usage: trainbig finetune --config=configs/finetune.py:PRESET --init_checkpoint=RUN --workdir=DIR
       [--config.compression.prune.final_sparsity=0.5 | --config.compression.qat.bits=4 ...]

The model's size, vocabulary and tokenizer come from the init checkpoint; this config sets
the task, the optimizer, dropout and compression-aware training.

Presets:
  demo               the embedded sentiment set (rotten_tomatoes); minutes on 2 CPU cores.
  demo_prune50       demo with gradual magnitude pruning to 50% during fine-tuning.
  demo_qat4          demo with 4-bit quantization-aware fine-tuning.
  sst2, mnli         GLUE through TFDS (prepare them once as array_record).
"""

import ml_collections

from trainbig_jax.configs import pretrain


def get_config(preset: str = 'demo') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.task_kind = 'classify'  # trainbig_jax.tasks registry name
  c.seed = 0
  c.task = 'rotten_tomatoes'  # see trainbig_jax.data.classification.TASKS
  c.max_len = 64  # tokens per example, <s> and </s> included
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.model = ml_collections.ConfigDict({'dropout': 0.1, 'attention_dropout': 0.1})
  c.train = pretrain.base_config().train
  c.train.batch_size = 32
  c.train.learning_rate = 2e-5
  c.train.warmup_steps = 100
  c.train.total_steps = 2000
  c.train.weight_decay = 0.1
  c.train.eval_every = 200
  c.train.checkpoint_every = 500
  c.train.log_every = 20
  c.train.keep_checkpoints = 2
  c.mesh = pretrain.base_config().mesh

  c.compression = ml_collections.ConfigDict()
  c.compression.prune = ml_collections.ConfigDict()
  c.compression.prune.final_sparsity = 0.0  # > 0 turns gradual magnitude pruning on
  c.compression.prune.begin_frac = 0.1  # ramp from begin_frac to end_frac of total_steps
  c.compression.prune.end_frac = 0.6
  c.compression.prune.update_every = 10
  c.compression.prune.scope = 'layer'  # 'layer' | 'global'
  c.compression.prune.include = (r'layers_\d+/.*/kernel$',)
  c.compression.prune.exclude = ()
  c.compression.qat = ml_collections.ConfigDict()
  c.compression.qat.bits = 0  # 2..8 turns quantization-aware training on; 0 is off
  c.compression.qat.symmetric = True
  c.compression.qat.per_channel = True
  c.compression.qat.include = (r'layers_\d+/.*/kernel$',)
  c.compression.qat.exclude = ()

  base, _, variant = preset.partition('_')
  if base == 'demo':
    c.max_len = 64
    c.model.dropout = c.model.attention_dropout = 0.1
    c.train.batch_size = 32
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 30
    c.train.total_steps = 400
    c.train.budget_s = 120.0
    c.train.eval_every = 100
    c.train.checkpoint_every = 200
  elif base == 'sst2':
    c.task = 'sst2'
    c.max_len = 128
    c.train.total_steps = 20_000
    c.train.warmup_steps = 1_200
    c.train.learning_rate = 1e-5
  elif base == 'mnli':
    c.task = 'mnli'
    c.max_len = 256
    c.train.total_steps = 120_000
    c.train.warmup_steps = 7_400
    c.train.learning_rate = 1e-5
    c.train.eval_every = 2000
    c.train.checkpoint_every = 2000
  else:
    raise ValueError(f'Unknown finetune preset {preset!r}; allowed: {", ".join(PRESETS)}.')
  if variant == 'prune50':
    c.compression.prune.final_sparsity = 0.5
  elif variant == 'qat4':
    c.compression.qat.bits = 4
  elif variant:
    raise ValueError(f'Unknown finetune preset {preset!r}; allowed: {", ".join(PRESETS)}.')
  return c


PRESETS = ('demo', 'demo_prune50', 'demo_qat4', 'sst2', 'mnli', 'sst2_prune50', 'mnli_prune50',
           'sst2_qat4', 'mnli_qat4')

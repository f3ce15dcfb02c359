"""RoBERTa-style masked-LM pretraining presets.

Usage: trainbig train --config=configs/pretrain.py:PRESET --workdir=DIR
       [--config.model.num_layers=6 --config.train.budget_s=600 ...]

Presets:
  tiny            2 layers x 32 wide; for tests (seconds on a CPU).
  demo            2 layers x 64 wide on the embedded corpus; about 2 minutes on 2 CPU cores.
  depth{3,6,12,18,24}   the paper's depth grid at hidden 768.
  width{256,512,768,1024,1536}  the paper's width grid at 6 layers... see WIDTH_GRID_LAYERS.
  roberta_base, roberta_large.
The paper-scale presets (depth*, width*, roberta_*) read English Wikipedia (PAPER_CORPUS; prepare it
once with `trainbig prepare --dataset=wikipedia/20230601.en`), holding out its first
PAPER_EVAL_ARTICLES articles for evaluation. TFDS has no BookCorpus and a run reads one
dataset: for Wikipedia plus books, or any text of your own, use
--config.data.dataset='files:/path/to/*.txt' --config.data.train_split=train
--config.data.eval_split=validation.
"""

import ml_collections

# The paper's width sweep holds depth fixed; 6 layers keeps the widest model trainable on one
# accelerator while still showing the trend (Li et al. 2020, Figure 2 uses 3 and 6 layers).
WIDTH_GRID_LAYERS = 6
DEPTH_GRID = (3, 6, 12, 18, 24)
WIDTH_GRID = (256, 512, 768, 1024, 1536)
# RoBERTa's corpus was Wikipedia + books; Wikipedia is the part TFDS prepares. It has only a
# 'train' split, so evaluation takes its first articles, training the rest.
PAPER_CORPUS = 'wikipedia/20230601.en'
PAPER_EVAL_ARTICLES = 10_000


def base_config() -> ml_collections.ConfigDict:
  """Every field a pretraining run reads, with RoBERTa-base-like defaults."""
  c = ml_collections.ConfigDict()
  c.preset = 'custom'
  c.task_kind = 'mlm'  # trainbig_jax.tasks registry name
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # 'trainbig_sotu' is the embedded corpus; any TFDS text dataset prepared as array_record
  # (e.g. 'wikipedia/20230601.en') goes through the same code.
  c.data.dataset = 'trainbig_sotu'  # or 'files:/path/*.txt' (data/user_files.py)
  c.data.text_key = 'text'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # default: $TRAINBIG_DATA_DIR or ~/.cache/trainbig_jax/tfds
  c.data.vocab_size = 32000
  c.data.tokenizer_path = ml_collections.config_dict.placeholder(str)  # reuse a trained model instead
  c.data.tokenizer_max_chars = 50_000_000  # text fed to SentencePiece training
  c.data.seq_len = 512
  c.data.mask_rate = 0.15
  c.data.mask_token_prob = 0.8
  c.data.random_token_prob = 0.1
  c.data.num_eval_batches = 20
  c.data.worker_count = 0  # grain worker processes; 0 reads in the main process

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 12
  c.model.hidden = 768
  c.model.num_heads = 12
  c.model.mlp_dim = 3072
  c.model.max_len = 514
  c.model.dropout = 0.1
  c.model.attention_dropout = 0.1
  c.model.pre_ln = False  # RoBERTa is post-LN
  c.model.dtype = 'float32'  # activations: 'float32' or 'bfloat16'; parameters stay fp32
  c.model.layer_norm_eps = 1e-5
  c.model.num_classes = 0  # >0 adds a classification head (fine-tuning)
  # Layers under nn.scan (stacked parameters; compile time independent of depth), and what
  # each layer keeps for the backward pass: 'none' | 'full' | 'dots_saveable' |
  # 'dots_with_no_batch_dims_saveable' (see models/encoder.py REMAT_POLICIES).
  c.model.scan_layers = False
  c.model.remat = 'none'
  # SelfAttention: 'einsum', 'xla', 'cudnn' or 'auto' (cuDNN where it fits, else XLA); the
  # fused paths take no attention dropout, so training with it uses 'einsum' (encoder.py).
  c.model.attention = 'auto'

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256  # global sequences per optimizer step
  c.train.grad_accum_steps = 1
  c.train.learning_rate = 5e-4
  c.train.warmup_steps = 10_000
  c.train.total_steps = 500_000  # also sets the linear decay horizon
  c.train.budget_s = 0.0  # wall-clock training budget in seconds; 0 means none
  # Machine-independent budgets (0: none): analytic training FLOPs (train/flops.py), or
  # tokens seen; the run stops within one step of the first budget reached.
  c.train.budget_flops = 0.0
  c.train.budget_tokens = 0.0
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.eps = 1e-6
  c.train.grad_clip = 1.0
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.eval_every_s = 0.0  # also evaluate every this many seconds of training (0: off)
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  # Non-finite steps (loss, gradient norm or update) skipped in a row before the run stops;
  # 0 stops at the first. A skipped step keeps the parameters and moves on to the next batch.
  c.train.max_nonfinite_skips = 0
  c.train.prefetch = 2  # batches put on the devices ahead of the step (0: drawn when needed)

  c.mesh = ml_collections.ConfigDict()
  # Sizes of the ('data', 'fsdp', 'tensor') mesh axes; -1 takes the remaining devices.
  c.mesh.shape = (-1, 1, 1)
  return c


def _paper_corpus(c):
  c.data.dataset = PAPER_CORPUS
  c.data.train_split = f'train[{PAPER_EVAL_ARTICLES}:]'
  c.data.eval_split = f'train[:{PAPER_EVAL_ARTICLES}]'
  return c


def set_size(c: ml_collections.ConfigDict, layers: int, hidden: int, heads: int | None = None
             ) -> ml_collections.ConfigDict:
  """`layers` encoder layers, `hidden` wide, heads and MLP by `set_width`."""
  c.model.num_layers = layers
  return set_width(c, hidden, heads)


def set_width(c: ml_collections.ConfigDict, hidden: int, heads: int | None = None
              ) -> ml_collections.ConfigDict:
  """The one width rule of every model family: heads = hidden // 64 (at least 1) unless
  given, MLP 4 x hidden."""
  c.model.hidden = hidden
  c.model.num_heads = heads or max(1, hidden // 64)
  c.model.mlp_dim = 4 * hidden
  return c


def get_config(preset: str = 'demo') -> ml_collections.ConfigDict:
  c = base_config()
  c.preset = preset
  if preset == 'tiny':
    set_size(c, 2, 32, heads=2)
    c.data.vocab_size = 512
    c.data.seq_len = 32
    c.data.tokenizer_max_chars = 2_000_000
    c.data.num_eval_batches = 2
    c.model.max_len = 34
    c.model.dropout = c.model.attention_dropout = 0.0
    c.train.batch_size = 16
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 5
    c.train.total_steps = 20
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.checkpoint_every = 10
  elif preset == 'demo':
    set_size(c, 2, 64, heads=2)
    c.data.vocab_size = 2000
    c.data.seq_len = 64
    c.data.tokenizer_max_chars = 4_000_000
    c.data.num_eval_batches = 8
    c.model.max_len = 66
    c.model.dropout = c.model.attention_dropout = 0.0
    c.train.batch_size = 32
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 50
    c.train.total_steps = 600
    c.train.budget_s = 150.0
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.checkpoint_every = 200
  elif preset.startswith('depth') and preset[5:].isdigit() and int(preset[5:]) in DEPTH_GRID:
    _paper_corpus(set_size(c, int(preset[5:]), 768))
  elif preset.startswith('width') and preset[5:].isdigit() and int(preset[5:]) in WIDTH_GRID:
    _paper_corpus(set_size(c, WIDTH_GRID_LAYERS, int(preset[5:])))
  elif preset == 'roberta_base':
    _paper_corpus(set_size(c, 12, 768))
  elif preset == 'roberta_large':
    _paper_corpus(set_size(c, 24, 1024, heads=16))
  else:
    raise ValueError(f'Unknown pretrain preset {preset!r}; allowed: {", ".join(PRESETS)}.')
  return c


PRESETS = (('tiny', 'demo')
           + tuple(f'depth{d}' for d in DEPTH_GRID)
           + tuple(f'width{w}' for w in WIDTH_GRID)
           + ('roberta_base', 'roberta_large'))

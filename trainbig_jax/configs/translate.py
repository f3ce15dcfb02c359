"""Translation presets: transformer encoder-decoders on English->French.

Usage: trainbig train --config=configs/translate.py:PRESET --workdir=DIR
       [--config.model.num_encoder_layers=4 --config.data.dataset=wmt14_translate/fr-en ...]

Presets:
  tiny              1+1 layers x 32 wide on the embedded corpus; for tests (seconds on a CPU).
  demo              2+2 layers on the embedded LibreOffice-help corpus; under 10 minutes on
                    2 CPU cores, eval_bleu above 5 on its validation split.
  depth{2,4,6,8,12} encoder and decoder depth varied together at width 512 (the MT depth
                    study of Li et al. 2020, Train Big, Then Compress).
  width{256,512,768,1024}  width varied at WIDTH_GRID_LAYERS encoder and decoder layers.
  transformer_base, transformer_big   Vaswani et al. (2017), for WMT14 En-Fr through TFDS.
"""

import ml_collections

from trainbig_jax.configs import pretrain
from trainbig_jax.data.translation import translation_data_config

WIDTH_GRID_LAYERS = 6
DEPTH_GRID = (2, 4, 6, 8, 12)
WIDTH_GRID = (256, 512, 768, 1024)
WMT14 = 'wmt14_translate/fr-en'


def base_config() -> ml_collections.ConfigDict:
  """Every field a translation run reads, with transformer_base-like defaults."""
  c = ml_collections.ConfigDict()
  c.preset = 'custom'
  c.task_kind = 'translate'
  c.seed = 0
  c.data = translation_data_config()

  c.model = ml_collections.ConfigDict()
  c.model.num_encoder_layers = 6
  c.model.num_decoder_layers = 6
  c.model.hidden = 512
  c.model.num_heads = 8
  c.model.mlp_dim = 2048
  c.model.max_len = 256  # positions per sentence; data.max_source_len/max_target_len fit in it
  c.model.dropout = 0.1
  c.model.attention_dropout = 0.0
  c.model.pre_ln = False  # the original Transformer is post-LN
  c.model.positions = 'sinusoidal'  # or 'learned'
  c.model.dtype = 'float32'  # activations: 'float32' or 'bfloat16'; parameters stay fp32
  c.model.layer_norm_eps = 1e-5
  c.model.label_smoothing = 0.1

  c.decode = ml_collections.ConfigDict()
  c.decode.beam_size = 4  # 1: greedy
  c.decode.length_penalty = 'gnmt'  # ((5 + len) / 6)^alpha; 'fairseq': len^alpha
  c.decode.alpha = 0.6

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # packed rows of data.pack_len per optimizer step
  c.train.grad_accum_steps = 1
  c.train.learning_rate = 7e-4
  c.train.warmup_steps = 4000
  c.train.total_steps = 100_000
  c.train.budget_s = 0.0
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.eps = 1e-9
  c.train.grad_clip = 0.0
  c.train.log_every = 100
  c.train.eval_every = 5000
  c.train.eval_every_s = 0.0
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # ('data', 'fsdp', 'tensor'); -1 takes the remaining devices
  return c


def set_size(c, layers, hidden, heads=None):
  """Encoder and decoder of `layers` layers each, `hidden` wide (pretrain.set_width's rule)."""
  c.model.num_encoder_layers = c.model.num_decoder_layers = layers
  return pretrain.set_width(c, hidden, heads)


def _lengths(c, max_len, pack_len):
  c.data.max_source_len = c.data.max_target_len = c.model.max_len = max_len
  c.data.pack_len = pack_len


def get_config(preset: str = 'demo') -> ml_collections.ConfigDict:
  c = base_config()
  c.preset = preset
  if preset == 'tiny':
    set_size(c, 1, 32, heads=2)
    _lengths(c, 32, 64)
    c.data.vocab_size = 256
    c.data.tokenizer_max_chars = 200_000
    c.data.eval_examples = 16
    c.model.dropout = 0.0
    c.decode.beam_size = 2
    c.train.batch_size = 32
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 5
    c.train.total_steps = 20
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.checkpoint_every = 10
  elif preset == 'demo':
    # A train step costs ~0.35 s on 2 cores, so the 420 s budget stops it near step 1,200
    # (about three epochs of the corpus); measured: step 1,191, eval_bleu 19.2 (README).
    set_size(c, 2, 128, heads=4)
    _lengths(c, 48, 64)
    c.data.vocab_size = 2000
    c.data.tokenizer_max_chars = 5_000_000
    c.data.eval_examples = 200
    c.model.dropout = 0.1
    c.decode.beam_size = 1  # greedy keeps the evaluations cheap; eval/translate may raise it
    c.train.batch_size = 32
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 150
    c.train.total_steps = 1500
    c.train.budget_s = 420.0
    c.train.log_every = 50
    c.train.eval_every = 300
    c.train.checkpoint_every = 300
  elif preset.startswith('depth') and preset[5:].isdigit() and int(preset[5:]) in DEPTH_GRID:
    set_size(c, int(preset[5:]), 512)
  elif preset.startswith('width') and preset[5:].isdigit() and int(preset[5:]) in WIDTH_GRID:
    set_size(c, WIDTH_GRID_LAYERS, int(preset[5:]))
  elif preset == 'transformer_base':
    set_size(c, 6, 512, heads=8)
  elif preset == 'transformer_big':
    set_size(c, 6, 1024, heads=16)
    c.train.learning_rate = 5e-4
  else:
    raise ValueError(f'Unknown translate preset {preset!r}; allowed: {", ".join(PRESETS)}.')
  if preset not in ('tiny', 'demo'):
    c.data.dataset = WMT14  # the paper's testbed; prepared through TFDS
  return c


PRESETS = (('tiny', 'demo')
           + tuple(f'depth{d}' for d in DEPTH_GRID)
           + tuple(f'width{w}' for w in WIDTH_GRID)
           + ('transformer_base', 'transformer_big'))

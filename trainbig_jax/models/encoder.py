"""RoBERTa-style transformer encoder with an MLM head and a classification head.

Every parameter and the main activations carry logical axis names; `train/partitioning.py`
maps them onto the ('data', 'fsdp', 'tensor') mesh. All dense kernels are 2-D [in, out]
(attention heads are contiguous column blocks), so compression can treat every matrix alike.

Parameter tree (post-LN, the RoBERTa layout):
  embed/{token,position}/embedding, embed/norm/{scale,bias}
  layers_i/attention/{query,key,value,out}/{kernel,bias}, layers_i/attention_norm/...
  layers_i/mlp/{wi,wo}/{kernel,bias}, layers_i/mlp_norm/...
  mlm_head/dense/..., mlm_head/norm/..., mlm_head/bias   (output projection tied to embed/token)
  classifier/dense/..., classifier/out/...                (when num_classes > 0)
The pre-LN variant has no embed/norm and a final_norm after the last layer instead.

With `scan_layers` the layers run under `nn.scan` and their parameters are stored stacked,
layers/attention/query/kernel [num_layers, in, out] ...: one layer is compiled once, so
compile time no longer grows with depth. `remat` recomputes each layer's activations in the
backward pass (a `jax.checkpoint` policy saves some of them). Neither changes the maths;
models/layer_stack.py converts between the stacked and the per-layer trees.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trainbig_jax.models.axes import (ACT_EMBED, ACT_HEADS, ACT_MLP, BATCH, CLASSES, EMBED,
                                      HEADS, LAYERS, LENGTH, MLP, POSITION,
                                      VOCAB)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# What a rematerialised layer keeps for the backward pass ('none': no remat, keep everything;
# 'full': keep only the layer's input and recompute the rest).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# SelfAttention implementations: 'einsum' (explicit logits, softmax, dropout), or
# jax.nn.dot_product_attention with 'xla', 'cudnn' (fused flash attention; GPU, bf16) or
# 'auto' (cuDNN where the backend, dtype and head size allow it, else XLA).
ATTENTION = ('einsum', 'xla', 'cudnn', 'auto')


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  vocab_size: int
  num_layers: int
  hidden: int
  num_heads: int
  mlp_dim: int
  max_len: int
  dropout: float = 0.1
  attention_dropout: float = 0.1
  pre_ln: bool = False
  dtype: str = 'float32'
  layer_norm_eps: float = 1e-5
  num_classes: int = 0
  pad_id: int = 0
  scan_layers: bool = False
  remat: str = 'none'
  attention: str = 'auto'  # one of ATTENTION

  @property
  def head_dim(self) -> int:
    return self.hidden // self.num_heads


def _dense(features: int, axes: tuple[str, str], dtype, name: str) -> nn.Dense:
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def _layer_norm(cfg: EncoderConfig, name: str) -> nn.LayerNorm:
  # Statistics in fp32 even when activations are bf16.
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (EMBED,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (EMBED,)))


def gelu(x: jax.Array) -> jax.Array:
  """The exact GELU RoBERTa uses, x * Phi(x), through erf: jax.nn.gelu(approximate=False)
  goes through erfc, whose XLA CPU expansion made GELU 1.6x slower forward + backward
  (within 1e-6 of it; benchmarks/RESULTS.md)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.sqrt(0.5).astype(x.dtype)))


def _constrain(x: jax.Array, *axes: str) -> jax.Array:
  return nn.with_logical_constraint(x, axes)


class SelfAttention(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    b, l, _ = x.shape

    def heads(name):
      y = _dense(cfg.hidden, (EMBED, HEADS), dtype, name)(x)
      y = _constrain(y, BATCH, LENGTH, ACT_HEADS)
      return y.reshape(b, l, cfg.num_heads, cfg.head_dim)

    q, k, v = heads('query'), heads('key'), heads('value')
    implementation = attention_implementation(cfg)
    if implementation == 'einsum' or (train and cfg.attention_dropout > 0):
      # The fused kernels take no dropout on the attention probabilities.
      probs = _attention_probs(q, k, key_mask, cfg)
      probs = nn.Dropout(cfg.attention_dropout, deterministic=not train)(probs)
      y = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    elif implementation == 'cudnn':
      # cuDNN's padding mode takes key lengths: the project's pipelines pad at the end of a
      # row. At least 1, so a fully padded row gives finite (ignored) outputs, not NaN.
      lengths = jnp.maximum(jnp.sum(key_mask, axis=1, dtype=jnp.int32), 1)
      y = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                       implementation='cudnn')
    else:
      y = jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :],
                                       implementation='xla')
    y = y.reshape(b, l, cfg.hidden)
    y = _constrain(y, BATCH, LENGTH, ACT_HEADS)
    return _dense(cfg.hidden, (HEADS, EMBED), dtype, 'out')(y)


def attention_implementation(cfg: EncoderConfig) -> str:
  """The SelfAttention path cfg.attention selects on this backend ('auto' resolved)."""
  if cfg.attention not in ATTENTION:
    raise ValueError(f'model.attention={cfg.attention!r} is invalid; allowed: '
                     f'{", ".join(ATTENTION)}.')
  if cfg.attention != 'auto':
    return cfg.attention
  cudnn_fits = (jax.default_backend() == 'gpu' and cfg.dtype == 'bfloat16'
                and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128)
  return 'cudnn' if cudnn_fits else 'xla'


def _attention_probs(q: jax.Array, k: jax.Array, key_mask: jax.Array,
                     cfg: EncoderConfig) -> jax.Array:
  """Softmax attention weights [b, heads, q, k], computed in fp32."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
  logits = logits / jnp.sqrt(cfg.head_dim).astype(jnp.float32)
  # key_mask [b, l]: padding keys get a large negative logit (finite, so no NaN on
  # fully padded rows).
  logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1).astype(DTYPES[cfg.dtype])


class Mlp(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dtype = DTYPES[self.cfg.dtype]
    h = _dense(self.cfg.mlp_dim, (EMBED, MLP), dtype, 'wi')(x)
    h = gelu(h)
    h = _constrain(h, BATCH, LENGTH, ACT_MLP)
    return _dense(self.cfg.hidden, (MLP, EMBED), dtype, 'wo')(h)


class EncoderLayer(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=not train)
    attention, mlp = SelfAttention(cfg, name='attention'), Mlp(cfg, name='mlp')
    attention_norm, mlp_norm = _layer_norm(cfg, 'attention_norm'), _layer_norm(cfg, 'mlp_norm')
    dtype = DTYPES[cfg.dtype]
    if cfg.pre_ln:
      x = x + drop(attention(attention_norm(x).astype(dtype), key_mask, train))
      x = x + drop(mlp(mlp_norm(x).astype(dtype), train))
    else:
      x = attention_norm(x + drop(attention(x, key_mask, train))).astype(dtype)
      x = mlp_norm(x + drop(mlp(x, train))).astype(dtype)
    return _constrain(x, BATCH, LENGTH, ACT_EMBED)


class Embeddings(nn.Module):
  """Token + learned position embeddings; `attend` reuses the token table for the MLM output."""
  cfg: EncoderConfig

  def setup(self):
    cfg = self.cfg
    init = nn.initializers.normal(0.02)
    self.token = nn.Embed(cfg.vocab_size, cfg.hidden, param_dtype=jnp.float32,
                          embedding_init=nn.with_logical_partitioning(init, (VOCAB, EMBED)))
    self.position = nn.Embed(cfg.max_len, cfg.hidden, param_dtype=jnp.float32,
                             embedding_init=nn.with_logical_partitioning(init, (POSITION, EMBED)))
    if not cfg.pre_ln:
      self.norm = _layer_norm(cfg, 'norm')

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.token(tokens) + self.position(jnp.arange(tokens.shape[1])[None, :])
    return x if self.cfg.pre_ln else self.norm(x)

  def attend(self, x: jax.Array) -> jax.Array:
    return self.token.attend(x.astype(jnp.float32))


class MlmHead(nn.Module):
  """dense -> GELU -> LayerNorm -> tied output projection + bias (as RobertaLMHead)."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, embed: Embeddings) -> jax.Array:
    cfg = self.cfg
    h = _dense(cfg.hidden, (EMBED, ACT_EMBED), DTYPES[cfg.dtype], 'dense')(x)
    h = _layer_norm(cfg, 'norm')(gelu(h))
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            (VOCAB,)), (cfg.vocab_size,))
    logits = embed.attend(h) + bias  # fp32 logits for a stable softmax
    return _constrain(logits, BATCH, LENGTH, VOCAB)


class ClassifierHead(nn.Module):
  """<s> features -> dropout -> dense -> tanh -> dropout -> out (as RobertaClassificationHead)."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=not train)
    h = jnp.tanh(_dense(cfg.hidden, (EMBED, ACT_EMBED), DTYPES[cfg.dtype], 'dense')(drop(x)))
    return _dense(cfg.num_classes, (EMBED, CLASSES), jnp.float32, 'out')(drop(h))


class Encoder(nn.Module):
  """tokens [batch, length] -> MLM logits [batch, length, vocab] or class logits [batch, C]."""
  cfg: EncoderConfig

  def setup(self):
    cfg = self.cfg
    self.embed = Embeddings(cfg)
    self.embed_dropout = nn.Dropout(cfg.dropout)
    layer = EncoderLayer
    if cfg.remat != 'none':  # `train` (argument 3, counting self) is a Python bool
      layer = nn.remat(EncoderLayer, policy=REMAT_POLICIES[cfg.remat], static_argnums=(3,))
    if cfg.scan_layers:
      self.layers = layer(cfg)  # one module whose parameters gain a leading layer axis
    else:
      self.layers = [layer(cfg) for _ in range(cfg.num_layers)]
    if cfg.pre_ln:
      self.final_norm = _layer_norm(cfg, 'final_norm')
    self.mlm_head = MlmHead(cfg)
    if cfg.num_classes > 0:
      self.classifier = ClassifierHead(cfg)

  def encode(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """Final hidden states [batch, length, hidden]."""
    cfg = self.cfg
    key_mask = tokens != cfg.pad_id
    x = self.embed_dropout(self.embed(tokens), deterministic=not train)
    x = _constrain(x.astype(DTYPES[cfg.dtype]), BATCH, LENGTH, ACT_EMBED)
    if cfg.scan_layers:
      x = _scan_layers(self.layers, x, key_mask, train, cfg.num_layers)
    else:
      for layer in self.layers:
        x = layer(x, key_mask, train)
    if cfg.pre_ln:
      x = self.final_norm(x).astype(DTYPES[cfg.dtype])
    return x

  def __call__(self, tokens: jax.Array, train: bool = False, task: str = 'mlm',
               positions: jax.Array | None = None) -> jax.Array:
    """MLM logits [batch, length, vocab], or only at `positions` [batch, P] -> [batch, P,
    vocab] (the masked ones: the vocabulary projection is the costliest matmul of a small
    model, and BERT/RoBERTa training only needs it where a token is predicted)."""
    x = self.encode(tokens, train)
    if task == 'mlm':
      if positions is not None:
        x = jnp.take_along_axis(x, positions[..., None], axis=1)
      return self.mlm_head(x, self.embed)
    if task == 'classify':
      if self.cfg.num_classes <= 0:
        raise ValueError('task="classify" needs model.num_classes > 0.')
      return self.classifier(x[:, 0], train)
    raise ValueError(f'Unknown task {task!r}; allowed: "mlm", "classify".')


def _scan_layers(layer: nn.Module, x: jax.Array, key_mask: jax.Array, train: bool,
                 num_layers: int) -> jax.Array:
  """`layer` applied `num_layers` times with stacked parameters (and dropout keys)."""
  def body(layer, carry, _):
    return layer(carry, key_mask, train), None
  scan = nn.scan(body, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                 length=num_layers, metadata_params={nn.PARTITION_NAME: LAYERS})
  return scan(layer, x, None)[0]


def encoder_config(model_config: Any, vocab_size: int, pad_id: int = 0) -> EncoderConfig:
  """EncoderConfig from the `model` section of an ml_collections config."""
  fields = {f.name for f in dataclasses.fields(EncoderConfig)} - {'vocab_size', 'pad_id'}
  return EncoderConfig(vocab_size=vocab_size, pad_id=pad_id,
                       **{k: model_config[k] for k in fields if k in model_config})

"""Export `Encoder` parameters to Hugging Face RoBERTa (`RobertaForMaskedLM`) names, and
`EncoderDecoder` parameters to Marian (`MarianMTModel`) names.

Pure numpy: torch/transformers are not imported here. Typical use:

  import torch, transformers
  hf = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**roberta_config(cfg)))
  sd = params_to_roberta_state_dict(flax.linen.meta.unbox(params), cfg)
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})

Position ids: RoBERTa numbers non-pad tokens pad_id+1, pad_id+2, ... (cumsum of the non-pad
mask), while `Encoder` uses arange(L). The two agree for right-padded inputs, which is what
our pipelines produce; our table goes to HF rows pad_id+1 ... pad_id+max_len, rows 0..pad_id
are zero. Only the post-LN layout has a RoBERTa equivalent (HF's RobertaPreLayerNorm keeps an
embedding LayerNorm that our pre-LN variant does not have).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from trainbig_jax.models.encoder import EncoderConfig
from trainbig_jax.models.encoder_decoder import EncoderDecoderConfig


def _np(x: Any) -> np.ndarray:
  return np.array(x, dtype=np.float32)  # a writable host copy (torch.from_numpy-friendly)


def roberta_config(cfg: EncoderConfig) -> dict[str, Any]:
  """Keyword arguments for `transformers.RobertaConfig` matching `cfg`."""
  kwargs = dict(
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.mlp_dim,
      hidden_act='gelu',  # exact erf GELU, as in the encoder
      hidden_dropout_prob=cfg.dropout,
      attention_probs_dropout_prob=cfg.attention_dropout,
      max_position_embeddings=cfg.max_len + cfg.pad_id + 1,
      type_vocab_size=1,
      layer_norm_eps=cfg.layer_norm_eps,
      pad_token_id=cfg.pad_id,
      position_embedding_type='absolute',
      tie_word_embeddings=True,
  )
  if cfg.num_classes > 0:
    kwargs['num_labels'] = cfg.num_classes
  return kwargs


def params_to_roberta_state_dict(params: Mapping[str, Any], cfg: EncoderConfig,
                                 task: str = 'mlm') -> dict[str, np.ndarray]:
  """Our (unboxed) param tree -> HF state_dict of numpy fp32 arrays.

  task='mlm' gives `RobertaForMaskedLM` names (tied decoder weight/bias included, so
  `load_state_dict(strict=True)` works); task='classify' gives
  `RobertaForSequenceClassification` names (encoder + classifier head, no LM head).
  """
  if cfg.pre_ln:
    raise ValueError('Only the post-LN encoder maps onto RoBERTa (cfg.pre_ln=True given).')
  if task not in ('mlm', 'classify'):
    raise ValueError(f'Unknown task {task!r}; allowed: "mlm", "classify".')
  if 'params' in params and 'embed' not in params:
    params = params['params']

  def linear(prefix: str, p: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {f'{prefix}.weight': _np(p['kernel']).T.copy(), f'{prefix}.bias': _np(p['bias'])}

  def norm(prefix: str, p: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {f'{prefix}.weight': _np(p['scale']), f'{prefix}.bias': _np(p['bias'])}

  embed = params['embed']
  token = _np(embed['token']['embedding'])
  position = _np(embed['position']['embedding'])
  if token.shape != (cfg.vocab_size, cfg.hidden) or position.shape != (cfg.max_len, cfg.hidden):
    raise ValueError(f'Embedding shapes {token.shape}, {position.shape} do not match {cfg}.')
  hf_position = np.zeros((cfg.max_len + cfg.pad_id + 1, cfg.hidden), np.float32)
  hf_position[cfg.pad_id + 1:] = position

  sd: dict[str, np.ndarray] = {
      'roberta.embeddings.word_embeddings.weight': token,
      'roberta.embeddings.position_embeddings.weight': hf_position,
      'roberta.embeddings.token_type_embeddings.weight': np.zeros((1, cfg.hidden), np.float32),
  }
  sd.update(norm('roberta.embeddings.LayerNorm', embed['norm']))
  for i in range(cfg.num_layers):
    layer, pre = params[f'layers_{i}'], f'roberta.encoder.layer.{i}'
    attention = layer['attention']
    for name in ('query', 'key', 'value'):
      sd.update(linear(f'{pre}.attention.self.{name}', attention[name]))
    sd.update(linear(f'{pre}.attention.output.dense', attention['out']))
    sd.update(norm(f'{pre}.attention.output.LayerNorm', layer['attention_norm']))
    sd.update(linear(f'{pre}.intermediate.dense', layer['mlp']['wi']))
    sd.update(linear(f'{pre}.output.dense', layer['mlp']['wo']))
    sd.update(norm(f'{pre}.output.LayerNorm', layer['mlp_norm']))

  if task == 'mlm':
    head = params['mlm_head']
    sd.update(linear('lm_head.dense', head['dense']))
    sd.update(norm('lm_head.layer_norm', head['norm']))
    sd['lm_head.bias'] = _np(head['bias'])
    sd['lm_head.decoder.weight'] = token  # tied to the token embedding
    sd['lm_head.decoder.bias'] = sd['lm_head.bias']
  else:
    if 'classifier' not in params:
      raise ValueError('task="classify" needs a classifier head (cfg.num_classes > 0).')
    sd.update(linear('classifier.dense', params['classifier']['dense']))
    sd.update(linear('classifier.out_proj', params['classifier']['out']))
  return sd


def marian_config(cfg: EncoderDecoderConfig) -> dict[str, Any]:
  """Keyword arguments for `transformers.MarianConfig` matching a post-LN, sinusoidal
  `EncoderDecoder` (Marian has no pre-LN variant nor learned positions)."""
  if cfg.pre_ln or cfg.positions != 'sinusoidal':
    raise ValueError('Only the post-LN, sinusoidal encoder-decoder maps onto Marian '
                     f'(pre_ln={cfg.pre_ln}, positions={cfg.positions!r} given).')
  return dict(
      vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, d_model=cfg.hidden,
      encoder_layers=cfg.num_encoder_layers, decoder_layers=cfg.num_decoder_layers,
      encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
      encoder_ffn_dim=cfg.mlp_dim, decoder_ffn_dim=cfg.mlp_dim,
      activation_function='gelu',  # exact erf GELU, the encoder's Mlp
      max_position_embeddings=cfg.max_len, dropout=0.0, attention_dropout=0.0,
      activation_dropout=0.0, scale_embedding=True, share_encoder_decoder_embeddings=True,
      tie_word_embeddings=True, pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id,
      decoder_start_token_id=cfg.bos_id, forced_eos_token_id=cfg.eos_id)


def params_to_marian_state_dict(params: Mapping[str, Any],
                                cfg: EncoderDecoderConfig) -> dict[str, np.ndarray]:
  """Our (unboxed) encoder-decoder tree -> `MarianMTModel` state_dict (numpy fp32).

  The sinusoidal position tables are not included: Marian builds its own, and the parity
  test checks that they agree with ours.
  """
  marian_config(cfg)  # rejects layouts Marian cannot express
  if 'params' in params and 'shared_embedding' not in params:
    params = params['params']

  def linear(prefix: str, p: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {f'{prefix}.weight': _np(p['kernel']).T.copy(), f'{prefix}.bias': _np(p['bias'])}

  def norm(prefix: str, p: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {f'{prefix}.weight': _np(p['scale']), f'{prefix}.bias': _np(p['bias'])}

  def attention(prefix: str, p: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj'),
                         ('out', 'out_proj')):
      out.update(linear(f'{prefix}.{theirs}', p[ours]))
    return out

  embedding = _np(params['shared_embedding']['embedding'])
  sd: dict[str, np.ndarray] = {
      'model.shared.weight': embedding, 'model.encoder.embed_tokens.weight': embedding,
      'model.decoder.embed_tokens.weight': embedding, 'lm_head.weight': embedding,
      'final_logits_bias': _np(params['final_logits_bias'])[None, :],
  }
  for stack, num_layers in (('encoder', cfg.num_encoder_layers),
                            ('decoder', cfg.num_decoder_layers)):
    for i in range(num_layers):
      layer, pre = params[stack][f'layers_{i}'], f'model.{stack}.layers.{i}'
      sd.update(attention(f'{pre}.self_attn', layer['attention']))
      sd.update(norm(f'{pre}.self_attn_layer_norm', layer['attention_norm']))
      if stack == 'decoder':
        sd.update(attention(f'{pre}.encoder_attn', layer['cross_attention']))
        sd.update(norm(f'{pre}.encoder_attn_layer_norm', layer['cross_attention_norm']))
      sd.update(linear(f'{pre}.fc1', layer['mlp']['wi']))
      sd.update(linear(f'{pre}.fc2', layer['mlp']['wo']))
      sd.update(norm(f'{pre}.final_layer_norm', layer['mlp_norm']))
  return sd

"""Export `Encoder` parameters to Hugging Face RoBERTa (`RobertaForMaskedLM`) names.

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

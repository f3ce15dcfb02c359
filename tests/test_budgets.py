"""Budgets a user can reproduce: one-line errors for bad FLOP/token budgets, the analytic FLOP
count, and the GPU sweep preset checked on CPU (its configs, its FLOPs, its time estimate)."""

import jax
import pytest

from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.configs import sweep as sweep_configs
from trainbig_jax.experiments import sweep
from trainbig_jax.tasks import classify, mlm
from trainbig_jax.train.checks import ConfigError
from trainbig_jax.train.flops import analytic_flops


class _Vocab:
  def __init__(self, size):
    self.vocab_size, self.pad_id = size, 0


@pytest.mark.parametrize('field, value', [('budget_flops', -1.0), ('budget_tokens', float('inf')),
                                          ('budget_tokens', float('nan'))])
def test_bad_budget_is_a_one_line_error(field, value):
  c = pretrain_configs.get_config('tiny')
  c.train[field] = value
  with pytest.raises(ConfigError, match=rf'^train\.{field}=.* is invalid: a finite number >= 0'):
    mlm.check_config(c)


def test_analytic_flops_counts_the_head_only_at_masked_positions():
  params = {'embed': {'token': {'embedding': jax.ShapeDtypeStruct((100, 8), 'float32'),
                                'position': {'embedding': jax.ShapeDtypeStruct((16, 8), 'f4')}}},
            'layer_0': {'kernel': jax.ShapeDtypeStruct((8, 8), 'float32')},
            'mlm_head': {'bias': jax.ShapeDtypeStruct((100,), 'float32')}}
  params['embed']['position'] = params['embed']['token'].pop('position')
  # 6 x (64 params x 32 tokens + (800 + 100) params x 4 predicted) + 12 x 1 x 8 x 16 x 32
  assert analytic_flops(params, 1, 8, 16, 32, 4) == 6 * (64 * 32 + 900 * 4) + 12 * 8 * 16 * 32


def test_gpu_preset_configs_are_valid_and_fit_ten_minutes():
  s = sweep_configs.get_config('gpu')
  sweep.check_sweep_config(s)
  layers, widths = [l for l, _ in s.sizes], [h for _, h in s.sizes]
  assert min(widths) == 256 and max(widths) >= 768 and min(layers) == 6 and max(layers) >= 12
  per_step = {}
  for kind in ('time', 'flops', 'tokens'):
    s.budget = kind
    for layers, hidden in s.sizes:
      c = sweep.pretrain_config(s, layers, hidden, None, seed=1,
                                tokenizer=_Vocab(s.pretrain_overrides.data.vocab_size))
      mlm.check_config(c)  # the trainer's own checks (8 simulated devices here)
      assert c.data.seq_len == 128 and c.seed == 1 and c.model.dtype == 'bfloat16'
      assert (c.train.budget_s > 0) == (kind == 'time')
      if kind == 'flops':
        per_step[hidden, layers] = mlm.flops_per_step(mlm.build_model(c, _Vocab(8192)), c)
        assert c.train.budget_flops == s.pretrain_budget_flops
        assert 1 < c.train.eval_every < c.train.total_steps
  classify.check_config(sweep.finetune_config(s))
  # Pretraining time alone leaves room for compilation, fine-tuning and evaluation.
  assert len(s.sizes) * s.pretrain_budget_s <= 240
  # The FLOP budget gives the largest size at least a few hundred steps.
  assert s.pretrain_budget_flops / per_step[768, 12] > 500

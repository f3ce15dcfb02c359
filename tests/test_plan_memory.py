"""trainbig plan-memory: per-device bytes from the compiled train step of a config.

Parameter and optimizer bytes equal an analytic count of the encoder's parameters under the
mesh rules; a preset that cannot fit a small target is reported as not fitting, with a hint
that, applied, makes it fit. The tiny preset on 8 simulated devices keeps compiles short.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.train import memory

ROOT = Path(__file__).resolve().parents[1]
MESH = (2, 4, 1)


def analytic_param_bytes_per_device(c, fsdp: int) -> int:
  """fp32 bytes of one device's parameter shards: every leaf with an embedding axis is split
  over fsdp; the biases over heads, mlp, vocabulary and the head's dense bias are not."""
  v, h, f, p, layers = (c.data.vocab_size, c.model.hidden, c.model.mlp_dim, c.model.max_len,
                        c.model.num_layers)
  embed_axis = v * h + p * h + 2 * h  # token, position, embed/norm (post-LN)
  embed_axis += layers * (4 * h * h + h + 2 * h * f + h + 4 * h)  # kernels, out/wo bias, norms
  embed_axis += h * h + 2 * h  # mlm_head dense kernel and norm
  other = layers * (3 * h + f) + h + v  # q/k/v and wi biases; head dense bias and mlm bias
  return 4 * (embed_axis // fsdp + other)


@pytest.fixture(scope='module')
def tiny_plan():
  config = pretrain_configs.get_config('tiny')
  config.train.batch_size = 64  # 8 sequences a device: room for smaller micro-batches
  return config, memory.plan_memory(config, MESH, 'v5e')


def test_parameter_and_optimizer_bytes_are_the_analytic_count(tiny_plan):
  config, plan = tiny_plan
  assert plan.fits and plan.hint is None
  expected = analytic_param_bytes_per_device(config, fsdp=MESH[1])
  assert plan.params_bytes == expected
  assert plan.gradient_bytes == expected
  # AdamW: two moments shaped like the parameters, plus step counters (a few int32).
  assert 0 <= plan.optimizer_bytes - 2 * expected <= 64
  assert plan.batch_bytes == 3 * 4 * config.train.batch_size * config.data.seq_len // 8
  assert plan.activation_bytes > 0 and plan.flops_per_device > 0
  assert plan.peak_bytes >= plan.params_bytes + plan.optimizer_bytes + plan.activation_bytes


def test_not_fitting_preset_gets_a_hint_that_fits_when_applied(tiny_plan):
  config, fitting = tiny_plan
  # A target whose usable memory leaves the activations 40% of what they need: more fsdp
  # alone cannot make room, smaller micro-batches can.
  fixed = fitting.peak_bytes - fitting.activation_bytes
  capacity = int((fixed + 0.4 * fitting.activation_bytes) / memory.USABLE_FRACTION)
  plan = memory.plan_memory(config, MESH, 'v5e', capacity_bytes=capacity)
  assert not plan.fits
  assert plan.hint.startswith('fits with'), plan.hint
  text = memory.format_plan(plan)
  assert 'does NOT fit' in text and f'hint: {plan.hint}' in text
  # Apply the hint's flags and plan again: it fits the same target.
  hinted = config.copy_and_resolve_references()
  mesh = MESH
  for flag in re.findall(r"--\S+", plan.hint.split(' (peak')[0]):
    name, value = flag[2:].split('=', 1)
    if name == 'mesh':
      mesh = memory.parse_mesh(value.strip("'"))
    else:
      section, field = name.removeprefix('config.').split('.')
      hinted[section][field] = type(hinted[section][field])(
          value == 'True' if value in ('True', 'False') else int(value)
          if value.isdigit() else value)
  assert hinted.train.grad_accum_steps > 1 or hinted.model.remat != 'none'
  assert memory.measure(memory._with(hinted, mesh__shape=mesh),
                        memory.get_accelerator('v5e'), capacity).fits


def test_grid_table_keeps_other_targets(tmp_path, monkeypatch):
  def fake_measure(config, accelerator, capacity_bytes=None):  # no compile
    return memory.MemoryPlan(
        preset=config.preset, mesh_shape=tuple(config.mesh.shape), accelerator=accelerator.name,
        compiled_for='test', batch_size=1, grad_accum_steps=1, remat='none',
        params_bytes=config.model.num_layers * 2 ** 30, optimizer_bytes=0, gradient_bytes=0,
        activation_bytes=0, batch_bytes=0, peak_bytes=config.model.num_layers * 2 ** 30,
        capacity_bytes=accelerator.hbm_bytes, flops_per_device=1e12, num_devices=8)
  monkeypatch.setattr(memory, 'measure', fake_measure)
  path = tmp_path / 'memory.md'
  memory.write_grid_table(path, (1, 8, 1), ['v5e', 'H100-80'], progress=lambda _: None)
  memory.write_grid_table(path, (1, 8, 1), ['v5e'], progress=lambda _: None)  # replaced, once
  text = path.read_text()
  assert text.count('## v5e, mesh') == 1 and text.count('## H100-80, mesh') == 1
  assert '| depth24 | (1, 8, 1) | v5e | 24.00 GiB |' in text
  assert '| depth12 | (1, 8, 1) | v5e | 12.00 GiB | 0.00 MiB | 0.00 MiB | 0.00 MiB | 12.00 GiB | ' \
         '14.40 GiB | yes |' in text
  assert '| depth18 | (1, 8, 1) | v5e | 18.00 GiB |' in text and '14.40 GiB | no |' in text
  assert '| width1536 |' in text


def test_cli_errors_are_one_line():
  result = subprocess.run(
      [sys.executable, '-m', 'trainbig_jax.cli', 'plan-memory',
       '--config=configs/pretrain.py:tiny', '--mesh=(1,8,1)', '--accelerator=tpu9'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "trainbig: error: --accelerator='tpu9' is unknown; allowed: v4, v5e, v5p, v6e, A100-40, "
      'A100-80, H100-80, H200.']
  with pytest.raises(memory.PlanError, match=r"--mesh='\(1,8\)' is invalid: give 3 positive"):
    memory.parse_mesh('(1,8)')
  with pytest.raises(memory.PlanError, match="--mesh='-1,8,1' is invalid"):
    memory.parse_mesh('-1,8,1')

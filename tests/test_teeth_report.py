"""The report's figures plot the numbers in results.jsonl and the runs' metrics.jsonl: the data
inside each matplotlib figure is checked against the files, not just that a PNG exists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from trainbig_jax.experiments import report as report_lib

from test_report import BIG, SMALL, make_curves, make_results, write_sweep


@pytest.fixture(scope='module')
def drawn(tmp_path_factory):
  """{png name: Figure} as write_report saved them, plus the sweep folder."""
  sweep = write_sweep(tmp_path_factory.mktemp('sweep'), make_results(), make_curves())
  figures: dict[str, Figure] = {}
  original = Figure.savefig

  def recording_savefig(self, fname, *args, **kwargs):
    figures[Path(fname).name] = self
    return original(self, fname, *args, **kwargs)

  mp = pytest.MonkeyPatch()
  mp.setattr(Figure, 'savefig', recording_savefig)
  try:
    report_lib.write_report(sweep)
  finally:
    mp.undo()
  return figures, sweep


def _rows(sweep):
  return [json.loads(line) for line in (sweep / 'results.jsonl').read_text().splitlines()]


def _evals(sweep, model):
  lines = (sweep / 'runs' / model / 'pretrain' / 'metrics.jsonl').read_text().splitlines()
  return [r for r in map(json.loads, lines) if 'eval_loss' in r]


def _lines_by_label(ax):
  return {line.get_label(): line for line in ax.get_lines()}


def test_every_figure_is_written(drawn):
  figures, sweep = drawn
  assert set(figures) == set(report_lib.FIGURES)
  for name in report_lib.FIGURES:
    assert (sweep / name).stat().st_size > 1000


def test_loss_figure_plots_each_runs_eval_curve(drawn):
  figures, sweep = drawn
  ax_t, ax_s = figures['loss_vs_time.png'].axes
  by_time, by_step = _lines_by_label(ax_t), _lines_by_label(ax_s)
  for m in (SMALL, BIG):
    evals = _evals(sweep, m)
    np.testing.assert_array_equal(by_time[m].get_xdata(), [r['wall_time_s'] for r in evals])
    np.testing.assert_array_equal(by_time[m].get_ydata(), [r['eval_loss'] for r in evals])
    np.testing.assert_array_equal(by_step[m].get_xdata(), [r['step'] for r in evals])
    np.testing.assert_array_equal(by_step[m].get_ydata(), [r['eval_loss'] for r in evals])
  # The dashed line marks claim 1's common time: the earliest final eval (30 s).
  claims = json.loads((sweep / 'claims.json').read_text())
  common = by_time['common time (claim 1)'].get_xdata()
  assert list(common) == [claims['bigger_lower_loss_at_equal_time']['evidence']['time_s']] * 2
  assert common[0] == min(_evals(sweep, m)[-1]['wall_time_s'] for m in (SMALL, BIG))


@pytest.mark.parametrize('name, method, x', [
    ('prune_accuracy.png', 'prune', lambda r: r['nonzero_params']),
    ('quant_accuracy.png', 'quantize', lambda r: r['stored_bytes'] / 1e6)])
def test_accuracy_figures_plot_the_results_rows(drawn, name, method, x):
  figures, sweep = drawn
  (ax,) = figures[name].axes
  lines = _lines_by_label(ax)
  assert set(lines) == {SMALL, BIG}
  for m in (SMALL, BIG):
    rows = sorted((x(r), r['accuracy']) for r in _rows(sweep)
                  if r['model'] == m and r['method'] in ('dense', method))
    assert len(rows) >= 4
    np.testing.assert_allclose(lines[m].get_xdata(), [p[0] for p in rows], rtol=1e-12)
    np.testing.assert_allclose(lines[m].get_ydata(), [p[1] for p in rows], rtol=1e-12)
  assert ax.get_xscale() == 'log'


def test_frontier_figure_plots_every_cell_and_the_pareto_front(drawn):
  figures, sweep = drawn
  (ax,) = figures['frontier.png'].axes
  rows = _rows(sweep)
  # Every cell as a faint point of its model's colour.
  clouds = {c.get_label(): c.get_offsets() for c in ax.collections}
  for m in (SMALL, BIG):
    pts = np.asarray(clouds[f'{m} (all cells)'])
    expected = [(r['stored_bytes'] / 1e6, r['accuracy']) for r in rows if r['model'] == m]
    np.testing.assert_allclose(sorted(map(tuple, pts)), sorted(expected))
  # The frontier, computed here independently: best accuracy so far by increasing size.
  front, best = [], -1.0
  for size, acc in sorted({(r['stored_bytes'], r['accuracy']) for r in rows},
                          key=lambda p: (p[0], -p[1])):
    if acc > best:
      front.append((size / 1e6, acc))
      best = acc
  step = _lines_by_label(ax)['frontier']
  np.testing.assert_allclose(step.get_xdata(), [p[0] for p in front])
  np.testing.assert_allclose(step.get_ydata(), [p[1] for p in front])
  assert len(front) >= 3

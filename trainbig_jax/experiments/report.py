"""The sweep report: claims verdicts, a results table and figures, from a sweep directory.

`write_report(DIR)` reads DIR/results.jsonl and DIR/runs/*/pretrain/metrics.jsonl and writes

  DIR/report.md            title, claims table, results table, figures, notes
  DIR/claims.json          evaluate_claims(...) as JSON
  DIR/loss_vs_time.png     validation MLM loss vs wall-clock seconds and vs steps, per size
  DIR/prune_accuracy.png   accuracy vs nonzero parameters under pruning, per size
  DIR/quant_accuracy.png   accuracy vs stored MB under quantization, per size
  DIR/frontier.png         best accuracy at each stored size: the Pareto frontier
"Accuracy" is the task's primary metric of each results row (claims.metric: accuracy for
classification, BLEU for translation); the file names stay the same for every task.

A figure with nothing to draw (e.g. a sweep without quantization) is not written, and the
report says so. Figures are drawn on matplotlib's Agg canvas directly, so writing a report
never changes the pyplot backend of the calling program (a notebook keeps its own).
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import matplotlib as mpl

from trainbig_jax.experiments import claims as claims_lib
from trainbig_jax.experiments import plan as plan_lib
from trainbig_jax.experiments import results as results_lib

Row = Mapping[str, Any]
Curves = Mapping[str, Mapping[str, Sequence[float]]]

FIGURES = ('loss_vs_time.png', 'prune_accuracy.png', 'quant_accuracy.png', 'frontier.png')
# Tokens of the embedded State of the Union corpus, an estimate (not a count): ~2.0 M words
# at ~1.3 SentencePiece tokens per word. Only used to warn about repeated epochs.
SOTU_TRAIN_TOKENS_ESTIMATE = 2.6e6
WALL_CLOCK_NOTE = ('Wall-clock times count training steps only: evaluation and checkpointing '
                   'are excluded, so sizes are compared on the time spent learning.')


# ----------------------------------------------------------------------------- figures

def _model_order(results: Sequence[Row], curves: Curves) -> list[str]:
  """Models from smallest to largest; models seen only in curves go last, by name."""
  sizes = claims_lib.model_sizes(results)
  return list(sizes) + sorted(set(curves) - set(sizes))


def _colors(models: Sequence[str]) -> dict[str, Any]:
  # One colour per size, dark (small) to bright (large), the same in every figure.
  cmap = mpl.colormaps['viridis']
  n = max(len(models) - 1, 1)
  return {m: cmap(0.85 * i / n) for i, m in enumerate(models)}


def _save(fig: Figure, path: Path) -> Path:
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=120)
  return path


def plot_loss_vs_time(curves: Curves, order: Sequence[str], path: Path,
                      common_time_s: float | None = None) -> Path | None:
  """Two panels: eval loss vs wall-clock seconds and vs steps, one curve per size."""
  models = [m for m in order if m in curves and curves[m]['eval_loss']]
  if not models:
    return None
  colors = _colors(order)
  fig = Figure(figsize=(11, 4.2), layout='constrained')
  ax_t, ax_s = fig.subplots(1, 2, sharey=True)
  for m in models:
    c = curves[m]
    ax_t.plot(c['wall_time_s'], c['eval_loss'], marker='o', ms=3, color=colors[m], label=m)
    ax_s.plot(c['step'], c['eval_loss'], marker='o', ms=3, color=colors[m], label=m)
  if common_time_s is not None:
    ax_t.axvline(common_time_s, color='grey', ls='--', lw=1, label='common time (claim 1)')
  ax_t.set_xlabel('pretraining wall-clock (s, excl. eval/checkpoint)')
  ax_s.set_xlabel('pretraining step')
  ax_t.set_ylabel('validation MLM loss')
  ax_t.set_title('loss vs wall-clock time')
  ax_s.set_title('loss vs steps')
  for ax in (ax_t, ax_s):
    ax.grid(alpha=0.3)
  ax_t.legend(fontsize=8)
  return _save(fig, path)


def _metric_plot(results: Sequence[Row], order: Sequence[str], path: Path,
                   keep: Callable[[Row], bool], x: Callable[[Row], float], xlabel: str,
                   title: str, annotate: Callable[[Row], str]) -> Path | None:
  rows = [r for r in results if keep(r)]
  # A size with only its dense cell has no curve to show: require a compressed cell.
  models = [m for m in order if any(r['model'] == m and r['method'] != 'dense' for r in rows)]
  if not models:
    return None
  colors = _colors(order)
  fig = Figure(figsize=(6.5, 4.5), layout='constrained')
  ax = fig.subplots()
  for m in models:
    pts = sorted((x(r), claims_lib.metric(r), annotate(r), r.get('metric_interval'))
                 for r in rows if r['model'] == m)
    xs, ys, labels, ivs = zip(*pts)
    ax.plot(xs, ys, marker='o', color=colors[m], label=m)
    if all(iv is not None for iv in ivs):  # the cell's bootstrap interval as an error bar
      ax.errorbar(xs, ys, yerr=[[y - lo for y, (lo, _) in zip(ys, ivs)],
                                [hi - y for y, (_, hi) in zip(ys, ivs)]],
                  fmt='none', ecolor=colors[m], elinewidth=1, capsize=2)
    pts = [p[:3] for p in pts]
    for xi, yi, lab in pts:
      ax.annotate(lab, (xi, yi), textcoords='offset points', xytext=(3, 3), fontsize=6,
                  color=colors[m])
  ax.set_xscale('log')
  ax.set_xlabel(xlabel)
  ax.set_ylabel(f'downstream validation {claims_lib.metric_name(results)}')
  ax.set_title(title)
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_prune_accuracy(results: Sequence[Row], order: Sequence[str], path: Path
                        ) -> Path | None:
  """Accuracy vs nonzero parameters (log x) under pruning; dense is sparsity 0."""
  return _metric_plot(
      results, order, path, keep=lambda r: r['method'] in ('dense', 'prune'),
      x=lambda r: r['nonzero_params'], xlabel='nonzero parameters (log)',
      title='magnitude pruning', annotate=lambda r: claims_lib.percent(r['sparsity']))


def plot_quant_accuracy(results: Sequence[Row], order: Sequence[str], path: Path
                        ) -> Path | None:
  """Accuracy vs stored MB (log x) under quantization; dense is the 32-bit point."""
  return _metric_plot(
      results, order, path, keep=lambda r: r['method'] in ('dense', 'quantize'),
      x=lambda r: r['stored_bytes'] / 1e6, xlabel='stored weights (MB, log)',
      title='weight quantization', annotate=lambda r: f'{r["bits"]}b')


def plot_frontier(results: Sequence[Row], order: Sequence[str], path: Path) -> Path | None:
  """Every cell (faint) and the Pareto frontier of accuracy vs stored MB, coloured by size."""
  if not results:
    return None
  colors = _colors(order)
  frontier = claims_lib.pareto_frontier(results)
  fig = Figure(figsize=(6.5, 4.5), layout='constrained')
  ax = fig.subplots()
  for m in order:
    rows = [r for r in results if r['model'] == m]
    if rows:
      ax.scatter([r['stored_bytes'] / 1e6 for r in rows], [claims_lib.metric(r) for r in rows],
                 s=14, color=colors[m], alpha=0.35, label=f'{m} (all cells)')
  # The frontier as a step: the best accuracy available at or below each size.
  xs = [r['stored_bytes'] / 1e6 for r in frontier]
  ys = [claims_lib.metric(r) for r in frontier]
  ax.step(xs, ys, where='post', color='black', lw=1, label='frontier')
  for r in frontier:
    ax.scatter([r['stored_bytes'] / 1e6], [claims_lib.metric(r)], s=60,
               color=colors[r['model']], edgecolors='black', zorder=3)
    if r.get('metric_interval') is not None:  # bootstrap interval over examples and seeds
      lo, hi = r['metric_interval']
      y = claims_lib.metric(r)
      ax.errorbar([r['stored_bytes'] / 1e6], [y], yerr=[[y - lo], [hi - y]], fmt='none',
                  ecolor=colors[r['model']], elinewidth=1, capsize=3, zorder=2)
    ax.annotate(claims_lib.cell_label(r), (r['stored_bytes'] / 1e6, claims_lib.metric(r)),
                textcoords='offset points', xytext=(4, -10), fontsize=6)
  ax.set_xscale('log')
  ax.set_xlabel('inference budget: stored weights (MB, log)')
  name = claims_lib.metric_name(results)
  ax.set_ylabel(f'best downstream validation {name}')
  ax.set_title(f'{name} frontier across sizes and compressions')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=7)
  return _save(fig, path)


# ----------------------------------------------------------------------------- tables

def _held_text(held: bool | None) -> str:
  return {True: 'yes', False: 'no', None: 'n/a'}[held]


def verdict_text(c: Mapping[str, Any]) -> str:
  """'held' / 'not held' / 'undecided' (claims from before verdicts existed: from `held`)."""
  return c.get('verdict') or {True: 'held', False: 'not held', None: 'undecided'}[c['held']]


def margin_text(c: Mapping[str, Any]) -> str:
  """'+0.0123 [-0.004, +0.029]': the decisive comparison's margin and interval, or '-'."""
  if c.get('interval') is None or c.get('margin') is None:
    return '-'
  lo, hi = c['interval']
  return f'{c["margin"]:+.4f} [{lo:+.4f}, {hi:+.4f}]'


def budget_text(c: Mapping[str, Any]) -> str:
  b = c.get('budget')
  if not b:
    return ''
  value = b['value']
  value = (f'{value:.3g}' if isinstance(value, float) else
           ', '.join(f'{v:.3g}' for v in value))
  return f'budget: {b["kind"]} ({value} {b["unit"]})'


def claims_table(claims: Mapping[str, Mapping[str, Any]], width: int = 120) -> str:
  """A plain-text table of verdicts for the terminal: claim key | verdict | margin [interval]
  | decisive numbers (with the rules and the budget that decided it)."""
  key_w = max([len('claim')] + [len(k) for k in claims])
  v_w = max(len('verdict'), *(len(verdict_text(c)) for c in claims.values()))
  m_w = max(len('margin [interval]'), *(len(margin_text(c)) for c in claims.values()))
  text_w = max(width - key_w - v_w - m_w - 9, 30)
  sep = f'{"-" * key_w}-+-{"-" * v_w}-+-{"-" * m_w}-+-{"-" * text_w}'
  lines = [f'{"claim":<{key_w}} | {"verdict":<{v_w}} | {"margin [interval]":<{m_w}} | '
           f'decisive numbers', sep]
  for key, c in claims.items():
    text = (f'[{c.get("rules", "strict")} rules; {budget_text(c)}] ' + c['explanation']
            + (f' ({c["rules_note"]})' if c.get('rules_note') else ''))
    wrapped = textwrap.wrap(text, text_w) or ['']
    lines.append(f'{key:<{key_w}} | {verdict_text(c):<{v_w}} | {margin_text(c):<{m_w}} | '
                 f'{wrapped[0]}')
    lines += [f'{"":<{key_w}} | {"":<{v_w}} | {"":<{m_w}} | {w}' for w in wrapped[1:]]
  return '\n'.join(lines)


def _md(text: Any) -> str:
  return str(text).replace('|', '\\|').replace('\n', ' ')


def _results_table(results: Sequence[Row], order: Sequence[str]) -> list[str]:
  rank = {m: i for i, m in enumerate(order)}
  method_rank = {m: i for i, m in enumerate(results_lib.METHODS)}
  rows = sorted(results, key=lambda r: (rank.get(r['model'], len(rank)),
                                        method_rank.get(r['method'], len(method_rank)),
                                        r['sparsity'], -r['bits']))
  name = claims_lib.metric_name(results)
  out = ['| model | params | seeds | steps | pretrain loss | method | sparsity | bits | MB | '
         f'{name} | sd over seeds | 95% interval |',
         '| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |']
  for r in rows:
    seeds = r.get('seed_rows', [r])
    losses = [x['pretrain_eval_loss'] for x in seeds if x['pretrain_eval_loss'] is not None]
    steps = sorted({x['pretrain_steps'] for x in seeds})
    iv = r.get('metric_interval')
    out.append(f'| {_md(r["model"])} | {r["total_params"]:,} | {len(seeds)} | '
               f'{"/".join(map(str, steps))} | '
               f'{"-" if not losses else format(sum(losses) / len(losses), ".4f")} | '
               f'{_md(r["method"])} | {claims_lib.percent(r["sparsity"])} | {r["bits"]} | '
               f'{r["stored_bytes"] / 1e6:.3f} | {claims_lib.metric(r):.4f} | '
               f'{r.get("metric_std", 0.0):.4f} | '
               f'{"-" if iv is None else f"[{iv[0]:.4f}, {iv[1]:.4f}]"} |')
  return out


def _budget_table(results: Sequence[Row], machine: Mapping[str, Any]) -> list[str]:
  """What each size spent of its pretraining budget (means over seeds), and the machine."""
  b = claims_lib.budget_of(results)
  value = budget_text({'budget': b}).split('(', 1)[-1].rstrip(')')
  out = [f'Pretraining budget: **{b["kind"]}**, {value}. '
         'Steps, tokens and analytic FLOPs are the same on any machine; seconds are this '
         'machine\'s.', '']
  if machine:
    out += [f'Machine: {machine.get("device_count")} x {machine.get("device_kind")} '
            f'({machine.get("platform")}), measured fp32 matmul rate '
            f'{machine["matmul_flops_per_s"] / 1e9:.3g} GFLOP/s '
            f'({machine.get("matmul_size")}^2), jax {machine.get("jax_version")}.', '']
  out += ['| model | steps | tokens | FLOPs | seconds |', '| --- | ---: | ---: | ---: | ---: |']
  for m, spent in b['spent'].items():
    cells = [f'{spent[k]:,.0f}' if k in spent else '-' for k in ('steps', 'tokens')]
    # A task that does not count its FLOPs (translation) records 0: shown as not counted.
    cells += [f'{spent[k]:.3g}' if spent.get(k) else '-' for k in ('flops', 'wall_s')]
    out.append(f'| {_md(m)} | ' + ' | '.join(cells) + ' |')
  return out


def _fits_table(curves: Curves, order: Sequence[str]) -> list[str]:
  fits = plan_lib.fit_learning_curves(curves)
  if not fits:
    return []
  out = ['| model | form | a | b | c (loss floor) | evals | fitted span (s) | rmse |',
         '| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |']
  for m in order:
    if m in fits:
      f = fits[m]
      out.append(f'| {_md(m)} | {f.form} | {f.a:.4g} | {f.b:.3f} | {f.c:.4f} | {f.n_points} '
                 f'| {f.t_min_s:.3g}-{f.t_max_s:.3g} | {f.rmse:.3g} |')
  return out


# ----------------------------------------------------------------------------- report

def _corpus_note(results: Sequence[Row], config: Mapping[str, Any]) -> list[str]:
  """Says when pretraining repeated the embedded corpus many times over."""
  tokens = max((r.get('pretrain_tokens') or 0.0) for r in results)
  dataset = ((config.get('pretrain_overrides') or {}).get('data') or {}).get(
      'dataset', 'trainbig_sotu')
  if dataset != 'trainbig_sotu' or not tokens:
    return []
  epochs = tokens / SOTU_TRAIN_TOKENS_ESTIMATE
  if epochs < 2:
    return []
  return [f'- Pretraining saw up to {tokens:,.0f} tokens, about {epochs:.0f} passes over the '
          f'embedded State of the Union corpus (~{SOTU_TRAIN_TOKENS_ESTIMATE / 1e6:.1f} M '
          f'tokens, estimated): repeated epochs, so losses partly measure memorisation. '
          f'A larger corpus '
          f'(e.g. `--config.pretrain_overrides.data.dataset=wikipedia/20230601.en` prepared '
          f'as array_record, or a Debian documentation corpus; see DESIGN.md) fits this '
          f'scale better.']


def write_report(sweep_dir: str | Path, rules: str = 'interval') -> Path:
  """Writes report.md, claims.json and the figures into `sweep_dir`; returns report.md's path.

  Everything is recomputed from the sweep's files, so rerunning after more cells finish (or
  after an interrupted sweep resumes) refreshes all outputs. Figures with no data are
  removed if left over from an earlier report, so no stale figure survives.
  """
  sweep_dir = Path(sweep_dir)
  if not sweep_dir.is_dir():
    raise results_lib.ResultsError(f'Sweep directory {sweep_dir} does not exist.')
  results = results_lib.load_results(sweep_dir)
  curves = results_lib.load_curves(sweep_dir)
  if not results and not curves:
    raise results_lib.ResultsError(
        f'{sweep_dir} has neither {results_lib.RESULTS_FILE} nor runs/*/pretrain/metrics.jsonl;'
        f' run `trainbig sweep --workdir={sweep_dir}` first.')
  config = results_lib.load_sweep_config(sweep_dir)
  examples = lambda relative: results_lib.load_examples(sweep_dir, relative)
  verdicts = claims_lib.evaluate_claims(results, curves, rules=rules, examples=examples)
  # Figures and tables show each cell once: the mean over seeds with its interval.
  raw_results, results = results, claims_lib.aggregate_seeds(results)
  for r in results:
    r['metric_interval'] = claims_lib.cell_interval(r['seed_rows'], examples)
  text = json.dumps(verdicts, indent=2) + '\n'
  tmp = sweep_dir / 'claims.json.tmp'
  tmp.write_text(text, encoding='utf-8')
  os.replace(tmp, sweep_dir / 'claims.json')

  order = _model_order(results, curves)
  common_t = verdicts[claims_lib.CLAIM_KEYS[0]]['evidence'].get('time_s')
  drawn = {
      'loss_vs_time.png': plot_loss_vs_time(curves, order, sweep_dir / 'loss_vs_time.png',
                                            common_t),
      'prune_accuracy.png': plot_prune_accuracy(results, order,
                                                sweep_dir / 'prune_accuracy.png'),
      'quant_accuracy.png': plot_quant_accuracy(results, order,
                                                sweep_dir / 'quant_accuracy.png'),
      'frontier.png': plot_frontier(results, order, sweep_dir / 'frontier.png'),
  }
  for name, path in drawn.items():
    if path is None:
      (sweep_dir / name).unlink(missing_ok=True)

  label = config.get('name') or config.get('preset') or sweep_dir.name
  md = [f'# Train big, then compress: sweep report ({_md(label)})', '',
        f'Sweep directory: `{sweep_dir}`. {len(order)} model size(s), {len(results)} '
        f'evaluated cell(s).', '',
        '## Claims (Li et al., ICML 2020)', '',
        '| claim | verdict | margin [95% interval] | rules, budget | decisive numbers |',
        '| --- | --- | --- | --- | --- |']
  for key, c in verdicts.items():
    md.append(f'| **{key}**: {_md(c["claim"])} | {verdict_text(c)} | {margin_text(c)} | '
              f'{c.get("rules", "strict")}; {_md(budget_text(c))} | {_md(c["explanation"])}'
              + (f' *({_md(c["rules_note"])})*' if c.get('rules_note') else '') + ' |')
  md += ['', 'A verdict is *held* when the whole interval of the decisive comparison lies on '
         'the claim\'s side of zero, *not held* when it lies on the other side, *undecided* '
         'when it includes zero (paired bootstrap over the same evaluation examples, '
         'hierarchical over seeds). Definitions are in `trainbig_jax/experiments/claims.py`; '
         'every comparison behind each verdict is in `claims.json`.', '']
  if raw_results:
    md += ['## Budget', ''] + _budget_table(raw_results, results_lib.load_machine(sweep_dir))
    md += [''] + _corpus_note(raw_results, config) + ['']

  md += ['## Figures', '']
  if any(r.get('metric_interval') for r in results):
    name = claims_lib.metric_name(results)
    md += [f'Error bars: each cell\'s 95% bootstrap interval of its {name} '
           '(over evaluation examples, and over seeds when there are several).', '']
  metric = claims_lib.metric_name(results)  # the task's primary metric
  captions = {
      'loss_vs_time.png': 'Validation loss of the training runs vs wall-clock time and vs steps',
      'prune_accuracy.png': f'{metric[0].upper()}{metric[1:]} vs nonzero parameters under '
                            f'magnitude pruning',
      'quant_accuracy.png': f'{metric[0].upper()}{metric[1:]} vs stored size under weight '
                            f'quantization',
      'frontier.png': f'Best {metric} at each inference budget (Pareto frontier)',
  }
  for name, path in drawn.items():
    if path is None:
      md += [f'*{captions[name]}: no data in this sweep.*', '']
    else:
      md += [f'![{captions[name]}]({name})', '']

  md += ['## Results', '']
  md += _results_table(results, order) if results else ['*No evaluated cells yet.*']
  md.append('')
  fits = _fits_table(curves, order)
  if fits:
    md += ['## Learning-curve fits', '',
           'Per size, eval loss L(t) = a * t^(-b) + c with t in wall-clock seconds '
           '(`trainbig_jax/experiments/plan.py`; used to recommend a size for another '
           'budget).', ''] + fits + ['']
  md += ['## Notes', '', f'- {WALL_CLOCK_NOTE}',
         '- MB are 10^6 bytes of the stored model weights as the sweep measured them '
         '(`stored_bytes`: the compressed storage, not a fp32 copy).', '']
  report = sweep_dir / 'report.md'
  report.write_text('\n'.join(md), encoding='utf-8')
  return report

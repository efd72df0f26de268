"""Figures drawn from the files a run wrote (never from live objects), so
they work on any finished or crashed run, and on older runs that lack some
statistics: a panel without data says so, a figure without data is skipped.

One PNG per figure; the same figure draws one run or several on shared axes
(colour = run, the legend names the config fields that differ):

  gradient_flow  mean and max |g| per weight layer at the last logged step;
                 each layer's gradient L2 norm at several steps
  grad_heatmap   log10 gradient L2 norm, weight layer (rows) x step
  curves         train, probe and eval loss; train and eval accuracy
  activations    saturated (tanh, sigmoid) or dead (ReLU) fraction, mean and
                 std per activation site, at several steps
  update_ratio   ||update|| / ||w|| per weight layer, against 1e-3
  bn             batch norm only: running against batch statistics per BN
                 layer, and the eval-mode minus train-mode probe loss

  python -m cnn_lab.plots run WORKDIR [--out DIR]            (WORKDIR/plots)
  python -m cnn_lab.plots compare WORKDIR [WORKDIR ...] --out DIR
  python -m cnn_lab.plots compare WORKDIR [WORKDIR ...] --out FILE.png
  python -m cnn_lab.plots gradient_flow WORKDIR [--out FILE.png]

`compare --out FILE.png` draws the one overview figure of the README
(gradient flow and loss); `--out DIR` draws every figure above into DIR.
"""

import json
import math
import pathlib
import sys
import textwrap

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.patches  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from cnn_lab.errors import ArgumentParser, ConfigError  # noqa: E402
from cnn_lab.runs import (RunFiles, load_runs, merge_order, run_labels,  # noqa: E402
                          to_float)

# The usual rule of thumb: an update of about 1e-3 of the weights per step.
UPDATE_RATIO_REFERENCE = 1e-3
DPI = 110
# More runs than this are counted, not named, in a figure's title; the
# heatmap puts at most HEATMAP_COLUMNS of them side by side.
TITLE_RUNS = 4
HEATMAP_COLUMNS = 6
# More runs than this (a sweep) show only their last step where a figure
# draws each run at several steps.
MANY_RUNS = 6


def _spread(count: int, points: int) -> list[int]:
  """Up to `points` indices into `count` items, spread evenly from the
  first to the last."""
  if count <= 1:
    return [0]
  return sorted({round(i * (count - 1) / (points - 1)) for i in range(points)})


def _pick_lines(lines: list[dict], count: int) -> list[dict]:
  """Up to `count` lines spread evenly from first to last."""
  if len(lines) <= count:
    return lines
  if count == 1:
    return lines[-1:]
  return [lines[i] for i in _spread(len(lines), count)]


def _early_to_late(i: int, count: int):
  """The i-th of `count` colours from dark (first) to yellow (last)."""
  return plt.get_cmap('viridis')(0.9 * i / max(count - 1, 1))


def _run_color(i: int):
  """tab10's colours, then their light twins (tab20's odd ones) for runs
  10 to 19 of a sweep."""
  if i % 20 < 10:
    return plt.get_cmap('tab10')(i % 10)
  return plt.get_cmap('tab20')(2 * (i % 10) + 1)


def _step_styles(runs, labels, num_points: int = 4):
  """(line, style kwargs) for "a value per layer at several steps".

  One run: `num_points` steps, coloured early (dark) to late (yellow). Several
  runs: colour = run, and the first, middle and last step dotted, dashed and
  solid; more than MANY_RUNS: the last step only.
  """
  if len(runs) == 1:
    picked = _pick_lines(runs[0].train_lines(), num_points)
    for i, line in enumerate(picked):
      yield line, dict(color=_early_to_late(i, len(picked)), linestyle='-',
                       label=f'step {line["step"]}')
    return
  for r, (run, label) in enumerate(zip(runs, labels)):
    picked = _pick_lines(run.train_lines(),
                         3 if len(runs) <= MANY_RUNS else 1)
    styles = [':', '--', '-'][-len(picked):]
    for line, style in zip(picked, styles):
      yield line, dict(color=_run_color(r), linestyle=style,
                       label=f'{label}, step {line["step"]}')


# --- Drawing on one panel. ---


def _plot_depth_series(ax, values, zeros, style='-', xs=None, **kwargs):
  """Plots per-layer values on a log axis. Exact zeros (layers that got no
  gradient at all) and non-finite values cannot be drawn there: they are
  remembered in `zeros` and marked at the edges of the axis by `_mark_zeros`.
  """
  values = [to_float(v) for v in values]
  xs = list(range(len(values))) if xs is None else list(xs)
  ax.plot(xs, [v if 0 < v < math.inf else math.nan for v in values],
          style, marker='o', ms=3, **kwargs)
  _remember_special(zeros, xs, values, kwargs.get('color'))


def _remember_special(zeros, xs, values, color):
  """Adds (x, colour, 'zero' or 'nonfinite') for values a log axis cannot
  show."""
  for x, v in zip(xs, values):
    if v == 0:
      zeros.append((x, color, 'zero'))
    elif not math.isfinite(v):
      zeros.append((x, color, 'nonfinite'))


def _mark_zeros(ax, zeros):
  """▼ at the bottom of a log axis for exact zeros, ▲ at the top for
  non-finite values (`zeros` from `_remember_special`)."""
  if not zeros:
    return
  bottom, top = ax.get_ylim()
  for x, color, kind in zeros:
    ax.plot([x], [top if kind == 'nonfinite' else bottom],
            marker='^' if kind == 'nonfinite' else 'v', ms=7, color=color,
            clip_on=False)
  ax.set_ylim(bottom, top)  # The markers must not widen the axis.
  kinds = {z[2] for z in zeros}
  notes = [note for kind, note in (
      ('zero', '▼ at the bottom: exactly 0'),
      ('nonfinite', '▲ at the top: not finite (nan/inf)')) if kind in kinds]
  ax.text(0.01, 0.98, '; '.join(notes), transform=ax.transAxes, fontsize=7,
          va='top')


def _per_layer(line, prefix, names):
  """Values of `prefix/<name>` for each name; None where not logged."""
  return [line.get(f'{prefix}/{n}') for n in names]


def _depth_lines(ax, styled_lines, names, prefix):
  """`prefix/<layer>` against depth, one curve per (line, style) of
  `styled_lines`, on the shared axis `names` (a layer a run lacks has no
  point). Returns the special points for `_mark_zeros`."""
  zeros = []
  for line, style in styled_lines:
    values = _per_layer(line, prefix, names)
    xs = [i for i, v in enumerate(values) if v is not None]
    if not xs:
      continue
    style = dict(style)
    ls = style.pop('linestyle')
    _plot_depth_series(ax, [values[i] for i in xs], zeros, ls, xs=xs,
                       **style)
  return zeros


def _plot_series(ax, steps, values, **kwargs):
  """A curve with non-finite values left as gaps."""
  ax.plot(steps, [v if math.isfinite(v) else math.nan for v in values],
          **kwargs)


def _finite_positive(values) -> list[float]:
  return [v for v in values if 0 < v < math.inf]


# --- A panel's axes, labels and legend. ---


def _panel(ax, title, ylabel, which='major', axis='both'):
  """A panel's title and y label, with a light grid (`which` lines of
  `axis`, as `Axes.grid` takes them)."""
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(True, which=which, axis=axis, alpha=0.3)


def _step_panel(ax, title, ylabel, which='major'):
  """A panel over training steps: integer step ticks on the x axis."""
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_xlabel('step')
  _panel(ax, title, ylabel, which)


def _depth_axis(ax, names, xlabel='layer (input → output)', log=True):
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=60, ha='right', fontsize=7)
  ax.set_xlim(-0.6, len(names) - 0.4)
  ax.set_xlabel(xlabel)
  if log:
    ax.set_yscale('log')
  ax.grid(True, which='both', axis='y', alpha=0.3)


def _has_positive(ax) -> bool:
  """Whether any line or bar on `ax` has a positive finite value."""
  for line in ax.get_lines():
    y = np.asarray(line.get_ydata(), float)
    if np.any(np.isfinite(y) & (y > 0)):
      return True
  return any(0 < p.get_height() < math.inf for p in ax.patches)


def _log_scale_if_positive(ax, values):
  """A log y axis where `values` hold a positive finite number and no
  negative one, with plain tick labels when it spans less than about a
  decade, as losses often do."""
  finite = [v for v in values if math.isfinite(v)]
  if not _finite_positive(values) or min(finite) < 0:
    return
  ax.set_yscale('log')
  bottom, top = ax.get_ylim()
  if 0 < bottom and top / bottom < 20:
    plain = matplotlib.ticker.FuncFormatter(lambda y, _: f'{y:.3g}')
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def _no_data(ax, text):
  ax.text(0.5, 0.5, text, transform=ax.transAxes, ha='center', va='center',
          fontsize=9, color='0.4')
  ax.set_yscale('linear')
  ax.set_yticks([])


def _legend(ax, handles=None, labels=None, **kwargs):
  """A legend to the right of the axes, where it hides no data."""
  if handles is None:
    handles, labels = ax.get_legend_handles_labels()
  if handles:
    ax.legend(handles, labels, fontsize=7, loc='upper left',
              bbox_to_anchor=(1.01, 1), borderaxespad=0, **kwargs)


def _style_handles(styles):
  """Grey legend handles showing line styles (what was measured, or which
  run), where colour means something else."""
  return [Line2D([], [], color='0.2', **style) for style in styles]


def _suptitle(fig, what, runs, notes=()):
  notes = f' ({"; ".join(notes)})' if notes else ''
  names = (', '.join(r.name for r in runs) if len(runs) <= TITLE_RUNS
           else f'{len(runs)} runs')
  fig.suptitle(f'{what}: {names}{notes}', fontsize=11)


def _last_finite_line(run, names) -> dict:
  """The last training line, or, in a run whose gradients went nan or
  inf, the last one before that with a positive finite mean |g|."""
  lines = run.train_lines()
  for line in reversed(lines):
    if any(0 < to_float(v) < math.inf
           for v in _per_layer(line, 'grad_mean_abs', names)):
      return line
  return lines[-1]


# --- The figures: each takes the runs and their legend labels and returns a
# matplotlib figure, or None when no run logged what it shows. ---


def figure_gradient_flow(runs, labels, num_points=4):
  """Mean and max |g| per weight layer at the last logged step (bars), and
  the gradient L2 norm per layer at several steps (lines)."""
  names = merge_order(r.weight_layers for r in runs)
  fig, (ax_b, ax_l) = plt.subplots(
      2, 1, figsize=(max(8, 0.45 * len(names) + 5), 9), sharex=True,
      layout='constrained')
  zeros = _gradient_bars(ax_b, runs, labels, names)
  _panel(ax_b, 'Gradient magnitude per layer at the last logged step '
         '(with finite gradients)', '|gradient| (mean: solid, max: pale)',
         which='both', axis='y')
  if _has_positive(ax_b):
    ax_b.set_yscale('log')
    _mark_zeros(ax_b, zeros)
    _legend(ax_b)
  else:
    _no_data(ax_b, 'no mean/max |g| logged (older run)' if not zeros else
             'no positive finite gradient at the last step')
  zeros = _depth_lines(ax_l, _step_styles(runs, labels, num_points), names,
                       'grad_norm')
  _depth_axis(ax_l, names, log=_has_positive(ax_l))
  _mark_zeros(ax_l, zeros)
  ax_l.set_ylabel('gradient L2 norm')
  ax_l.set_title('Gradient L2 norm per layer at several steps', fontsize=10)
  _legend(ax_l)
  _suptitle(fig, 'Gradient flow', runs)
  return fig


def _gradient_bars(ax, runs, labels, names) -> list:
  """Mean |g| bars with max |g| pale behind, one slot per run in each
  layer, at each run's last finite line; returns the special points."""
  width = 0.8 / len(runs)
  zeros = []
  for r, (run, label) in enumerate(zip(runs, labels)):
    line = _last_finite_line(run, names)
    offset = (r - (len(runs) - 1) / 2) * width
    who = f'{label}, ' if len(runs) > 1 else ''
    for prefix, alpha, what in (('grad_max_abs', 0.35, 'max |g|'),
                                ('grad_mean_abs', 1.0, 'mean |g|')):
      values = _per_layer(line, prefix, names)
      xs = [i + offset for i, v in enumerate(values) if v is not None]
      ys = [to_float(v) for v in values if v is not None]
      if not xs:
        continue
      ax.bar(xs, [y if 0 < y < math.inf else 0 for y in ys], width,
             color=_run_color(r), alpha=alpha,
             label=f'{who}{what} at step {line["step"]}')
      _remember_special(zeros, xs, ys, _run_color(r))
  return zeros


def figure_grad_heatmap(runs, labels):
  """log10 gradient L2 norm, weight layer (rows, input at top) x logged step
  (columns), one panel per run on one colour scale."""
  names = merge_order(r.weight_layers for r in runs)
  grids = [_gradient_grid(run, names) for run in runs]
  finite = np.concatenate([v[np.isfinite(v) & (v > 0)]
                           for _, _, v in grids])
  if not finite.size:
    return None
  vmin, vmax = np.log10(finite.min()), np.log10(finite.max())
  if vmax - vmin < 1e-6:
    vmin, vmax = vmin - 0.5, vmax + 0.5
  # Many runs (a sweep) wrap into rows of HEATMAP_COLUMNS panels.
  cols = min(len(runs), HEATMAP_COLUMNS)
  rows = math.ceil(len(runs) / cols)
  fig, axes = plt.subplots(
      rows, cols, squeeze=False, sharey=True, layout='constrained',
      figsize=(3.2 + 3.8 * cols,
               rows * max(3.5, 0.28 * len(names) + 2)))
  zero = nonfinite = False
  for ax, run, label, grid in zip(axes.flat, runs, labels, grids):
    image, has_zero, has_nonfinite = _heatmap_panel(ax, *grid, vmin, vmax)
    zero, nonfinite = zero or has_zero, nonfinite or has_nonfinite
    ax.set_title(label if len(runs) > 1 else run.name, fontsize=9)
  for ax in axes.flat[len(runs):]:
    ax.set_axis_off()
  for row in axes:
    row[0].set_yticks(range(len(names)))
    row[0].set_yticklabels(names, fontsize=7)
    row[0].set_ylabel('layer (input at top)')
  extend = {(True, True): 'both', (True, False): 'min',
            (False, True): 'max'}.get((zero, nonfinite), 'neither')
  bar = fig.colorbar(image, ax=axes.ravel().tolist(), extend=extend,
                     fraction=0.05 / rows, pad=0.02)
  bar.set_label('log10 gradient L2 norm')
  _suptitle(fig, 'Gradient L2 norm by layer and step', runs, [
      n for n, on in (('black: exactly 0', zero),
                      ('magenta: not finite', nonfinite)) if on])
  return fig


def _gradient_grid(run, names):
  """A run's training lines, which (layer, line) cells were logged, and
  their gradient norms (layers x lines)."""
  lines = run.train_lines()
  keys = [[f'grad_norm/{n}' in l for l in lines] for n in names]
  values = [[to_float(l.get(f'grad_norm/{n}')) for l in lines]
            for n in names]
  return (lines, np.array(keys, bool).reshape(len(names), -1),
          np.array(values, float).reshape(len(names), -1))


def _heatmap_panel(ax, lines, logged, values, vmin, vmax):
  """One run's grid on the shared colour scale: black exactly zero,
  magenta not finite, grey not logged (a layer this run does not have).
  Returns the image and whether zero and non-finite cells occur."""
  cmap = plt.get_cmap('viridis').with_extremes(under='black', over='magenta',
                                                bad='0.85')
  ok = np.isfinite(values) & (values > 0)
  zero = logged & (values == 0)
  nonfinite = logged & ~np.isfinite(values)
  shown = np.full(values.shape, np.nan)
  shown[ok] = np.log10(values[ok])
  shown[zero] = vmin - 1
  shown[nonfinite] = vmax + 1
  image = ax.imshow(np.ma.masked_invalid(shown), aspect='auto',
                    interpolation='nearest', cmap=cmap, vmin=vmin, vmax=vmax)
  ticks = _spread(len(lines), 6)
  ax.set_xticks(ticks)
  ax.set_xticklabels([lines[i]['step'] for i in ticks], fontsize=7)
  ax.set_xlabel('step')
  return image, bool(zero.any()), bool(nonfinite.any())


LOSS_CURVES = (
    ('train/loss', 'train batch', dict(linestyle='-')),
    ('probe/loss', 'probe batch, no dropout', dict(linestyle='--')),
    ('probe/eval_mode_loss', 'probe batch, eval mode', dict(linestyle='-.')),
    ('eval/loss', 'eval', dict(linestyle=':', marker='s', ms=5)))
ACCURACY_CURVES = (
    ('train/accuracy', 'train batch', dict(linestyle='-')),
    ('eval/accuracy', 'eval', dict(linestyle=':', marker='s', ms=5)))


def figure_curves(runs, labels):
  """Loss (train batch, probe batch, eval subset) and accuracy per step;
  colour = run, line style = what was measured."""
  fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(14, 4.8),
                                   layout='constrained')
  losses = _curves_panel(ax_l, runs, labels, LOSS_CURVES)
  _curves_panel(ax_a, runs, labels, ACCURACY_CURVES)
  for r, run in enumerate(runs):
    first = to_float(run.last('nonfinite/first_step'))
    if math.isfinite(first):
      for ax in (ax_l, ax_a):
        ax.axvline(first, color=_run_color(r), linestyle=(0, (1, 3)))
      ax_l.text(first, 0.02, ' first non-finite step',
                color=_run_color(r), fontsize=7, rotation=90, va='bottom',
                transform=ax_l.get_xaxis_transform())
  _log_scale_if_positive(ax_l, losses)
  _step_panel(ax_l, 'Loss', 'loss', which='both')
  _step_panel(ax_a, 'Accuracy', 'accuracy')
  ax_a.set_ylim(0, 1)
  _suptitle(fig, 'Training curves', runs)
  return fig


def _curves_panel(ax, runs, labels, curves) -> list[float]:
  """Each run's `curves` (key, what, style) over steps, in the run's
  colour, with one legend entry per measurement and one per run; returns
  every value drawn."""
  drawn, values = {}, []
  for r, run in enumerate(runs):
    for key, what, style in curves:
      steps, ys = run.series(key)
      if steps:
        _plot_series(ax, steps, ys, color=_run_color(r), label=what,
                     **style)
        drawn[what] = style
        values += ys
  if len(runs) > 1:
    _legend(ax, _style_handles(drawn.values()) + [
        Line2D([], [], color=_run_color(r), linewidth=3)
        for r in range(len(runs))], list(drawn) + labels)
  else:
    _legend(ax)
  return values


def _fraction_key(line, site):
  for prefix in ('act_saturated', 'act_dead'):
    if f'{prefix}/{site}' in line:
      return f'{prefix}/{site}'
  return None


def figure_activations(runs, labels, num_points=4):
  """Per activation site at several steps: the saturated (tanh, sigmoid) or
  dead (ReLU) fraction, the mean and the standard deviation."""
  if not any(r.has('act_') for r in runs):
    return None
  sites = merge_order(r.sites for r in runs)
  fig, (ax_f, ax_m, ax_s) = plt.subplots(
      3, 1, figsize=(max(8, 0.4 * len(sites) + 5), 11), sharex=True,
      layout='constrained')
  kinds = set()
  for line, style in _step_styles(runs, labels, num_points):
    keys = [_fraction_key(line, s) for s in sites]
    kinds.update(k.split('/')[0] for k in keys if k)
    for ax, values in (
        (ax_f, [line[k] if k else None for k in keys]),
        (ax_m, _per_layer(line, 'act_mean', sites)),
        (ax_s, _per_layer(line, 'act_std', sites))):
      xs = [i for i, v in enumerate(values) if v is not None]
      ys = [to_float(values[i]) for i in xs]
      if xs:
        ax.plot(xs, [y if math.isfinite(y) else math.nan for y in ys],
                marker='o', ms=3, **style)
  what = {frozenset({'act_saturated'}): 'fraction of saturated units',
          frozenset({'act_dead'}): 'fraction of dead ReLU channels'}.get(
              frozenset(kinds), 'saturated (tanh, sigmoid) or dead (ReLU) '
              'fraction')
  _panel(ax_f, 'Saturated or dead units per activation site', what,
         axis='y')
  ax_f.yaxis.label.set_fontsize(8)
  ax_f.set_ylim(-0.03, 1.03)
  if not kinds:
    _no_data(ax_f, 'no saturation or dead-unit statistics logged')
  _panel(ax_m, 'Mean activation', 'activation mean', axis='y')
  if not ax_m.get_lines():
    _no_data(ax_m, 'no activation means logged')
  ax_m.axhline(0, color='0.5', linewidth=0.8)
  ax_s.set_ylabel('activation std')
  ax_s.set_title('Standard deviation of the activations', fontsize=10)
  _depth_axis(ax_s, sites, 'activation site (input → output)',
              log=_has_positive(ax_s))
  if not ax_s.get_lines():
    _no_data(ax_s, 'no activation standard deviations logged')
  _legend(ax_f if kinds else ax_m)
  _suptitle(fig, 'Activations', runs)
  return fig


def figure_update_ratio(runs, labels, num_points=4):
  """||update|| / ||w|| per weight layer at several steps, log scale, with
  the 1e-3 rule of thumb."""
  if not any(r.has('update_ratio/') for r in runs):
    return None
  names = merge_order(r.weight_layers for r in runs)
  fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(names) + 5), 5),
                         layout='constrained')
  zeros = _depth_lines(ax, _step_styles(runs, labels, num_points), names,
                       'update_ratio')
  ax.axhline(UPDATE_RATIO_REFERENCE, color='0.3', linestyle='--',
             linewidth=1.2,
             label=f'{UPDATE_RATIO_REFERENCE:g} (rule of thumb)')
  ax.text(0.01, UPDATE_RATIO_REFERENCE, f' {UPDATE_RATIO_REFERENCE:g}: rule '
          'of thumb', transform=ax.get_yaxis_transform(), ha='left',
          va='bottom', fontsize=8, color='0.3',
          bbox=dict(facecolor='white', edgecolor='none', alpha=0.7, pad=1))
  _depth_axis(ax, names)
  _mark_zeros(ax, zeros)
  ax.set_ylabel('||update|| / ||w||')
  ax.set_title('Relative update size per layer at several steps',
               fontsize=10)
  _legend(ax)
  _suptitle(fig, 'Update ratio', runs)
  return fig


# One line style per run in the batch-norm figure, where colour is depth.
RUN_STYLES = ('-', '--', ':', '-.')


def figure_bn(runs, labels):
  """Running against batch statistics per BN layer over time (colour =
  depth, line style = run), and the probe loss in eval minus train mode."""
  if not any(r.has('bn_') or r.has('probe/bn_train_eval_gap')
             for r in runs):
    return None
  layers = merge_order(r.bn_layers for r in runs)
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), layout='constrained')
  colors = {n: _early_to_late(i, len(layers)) for i, n in enumerate(layers)}
  for ax, prefix, what in ((axes[0], 'bn_mean_gap', 'mean'),
                           (axes[1], 'bn_var_gap', 'variance')):
    _bn_gap_panel(ax, runs, layers, colors, prefix, what)
  with_bn = [r for r, run in enumerate(runs) if run.bn_layers]
  if len(runs) > 1 and with_bn:  # Which line style is which run.
    axes[0].legend(
        _style_handles(dict(linestyle=RUN_STYLES[r % len(RUN_STYLES)])
                       for r in with_bn),
        [labels[r] for r in with_bn], fontsize=7)
  if layers:
    _layer_colorbar(fig, axes[:2].tolist(), layers, colors)
  ax = axes[2]
  for r, (run, label) in enumerate(zip(runs, labels)):
    steps, ys = run.series('probe/bn_train_eval_gap')
    if steps:
      _plot_series(ax, steps, ys, color=_run_color(r), marker='o', ms=3,
                   label=label)
  if not ax.get_lines():
    _no_data(ax, 'no probe/bn_train_eval_gap logged')
  ax.axhline(0, color='0.5', linewidth=0.8)
  _step_panel(ax, 'Probe batch: eval-mode minus train-mode loss',
              'eval-mode minus train-mode loss')
  _legend(ax)
  _suptitle(fig, 'Batch norm', runs)
  return fig


def _bn_gap_panel(ax, runs, layers, colors, prefix, what):
  """`prefix/<layer>` over steps: colour = the layer's depth, line style =
  the run."""
  values = []
  for r, run in enumerate(runs):
    for name in layers:
      steps, ys = run.series(f'{prefix}/{name}')
      if steps:
        _plot_series(ax, steps, ys, color=colors[name],
                     linestyle=RUN_STYLES[r % len(RUN_STYLES)],
                     linewidth=1.2)
        values += ys
  _log_scale_if_positive(ax, values)
  if not values:
    _no_data(ax, f'no bn_{prefix[3:]} logged')
  _step_panel(ax, f'BN {what}: running vs batch statistics',
              f'gap: running vs batch {what}', which='both')


def _layer_colorbar(fig, axes, layers, colors):
  """A colour bar naming the layers of `colors`, input at the top."""
  mappable = plt.cm.ScalarMappable(
      plt.Normalize(-0.5, len(layers) - 0.5),
      matplotlib.colors.ListedColormap([colors[n] for n in layers]))
  ticks = _spread(len(layers), 8)
  bar = fig.colorbar(mappable, ax=axes, ticks=ticks, fraction=0.04, pad=0.01)
  bar.ax.set_yticklabels([layers[i] for i in ticks], fontsize=7)
  bar.ax.invert_yaxis()  # Input at the top, as in the heatmap.
  bar.set_label('BN layer')


# Name (the PNG's stem) -> drawing function, in the order a report shows them.
FIGURES = {
    'gradient_flow': figure_gradient_flow,
    'grad_heatmap': figure_grad_heatmap,
    'curves': figure_curves,
    'activations': figure_activations,
    'update_ratio': figure_update_ratio,
    'bn': figure_bn,
}


def _save(fig, out) -> pathlib.Path:
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=DPI)
  plt.close(fig)
  return out


def draw_figures(runs: list[RunFiles], out_dir) -> list[pathlib.Path]:
  """Every figure of FIGURES that has data, as `<out_dir>/<name>.png`."""
  labels = legend_labels(runs)
  paths = []
  for name, draw in FIGURES.items():
    fig = draw(runs, labels)
    if fig is not None:
      paths.append(_save(fig, pathlib.Path(out_dir) / f'{name}.png'))
  return paths


def plot_run(workdir) -> list[pathlib.Path]:
  """One run's figures, into `<workdir>/plots/`; returns the PNGs written."""
  runs = load_runs([workdir])
  return draw_figures(runs, runs[0].workdir / 'plots')


def plot_comparisons(workdirs, out_dir) -> list[pathlib.Path]:
  """Several runs on shared axes, one PNG per figure in `out_dir`."""
  return draw_figures(load_runs(workdirs), out_dir)


def plot_gradient_flow(workdir, out=None, num_points: int = 4) -> pathlib.Path:
  """One run's gradient-flow figure (by default `plots/gradient_flow.png`)."""
  run = load_runs([workdir])[0]
  out = out or run.workdir / 'plots' / 'gradient_flow.png'
  return _save(figure_gradient_flow([run], [run.name], num_points), out)


def legend_labels(runs: list[RunFiles]) -> list[str]:
  """`run_labels`, wrapped to fit a legend; runs that differ in too many
  fields to list are named by their run name (or folder) instead."""
  if len(runs) == 1:
    return [runs[0].name]
  labels = run_labels(runs)
  if max(len(l) for l in labels) > 120:
    labels = [r.name for r in runs]
    if len(set(labels)) < len(labels):
      labels = [f'{r.name} ({r.workdir.name})' for r in runs]
  return [textwrap.fill(l, 40) for l in labels]


def plot_compare(workdirs, out) -> pathlib.Path:
  """Several runs on one overview figure: gradient flow by depth and the
  loss curves.

  Left: per-layer gradient norm at the first (dashed) and last (solid)
  logged step of each run, on a shared layer axis. Right: train loss, and
  eval accuracy where the runs evaluated.
  """
  runs = load_runs(workdirs)
  labels = run_labels(runs)
  names = merge_order(r.weight_layers for r in runs)
  fig, (ax_g, ax_l) = plt.subplots(
      1, 2, figsize=(max(12, 0.4 * len(names) + 8), 5),
      gridspec_kw={'width_ratios': [3, 2]})
  first_and_last = [
      (line, dict(linestyle=style, color=_run_color(i),
                  label=f'{label}, step {line["step"]}'))
      for i, (run, label) in enumerate(zip(runs, labels))
      for line, style in ((run.train_lines()[0], '--'),
                          (run.train_lines()[-1], '-'))]
  zeros = _depth_lines(ax_g, first_and_last, names, 'grad_norm')
  for i, (run, label) in enumerate(zip(runs, labels)):
    _plot_series(ax_l, *run.series('train/loss'), color=_run_color(i),
                 label=label)
  _depth_axis(ax_g, names, log=_has_positive(ax_g))
  _mark_zeros(ax_g, zeros)
  ax_g.set_ylabel('gradient L2 norm')
  ax_g.set_title('Gradient flow (dashed: first logged step, solid: last)')
  ax_g.legend(fontsize=7)
  ax_l.set_xlabel('step')
  ax_l.set_ylabel('train loss')
  if _has_positive(ax_l):
    ax_l.set_yscale('log')
  ax_l.grid(True, alpha=0.3)
  ax_l.set_title('Training loss')
  ax_l.legend(fontsize=7)
  acc = [run.series('eval/accuracy') for run in runs]
  if any(steps for steps, _ in acc):
    ax_a = ax_l.twinx()
    for i, (steps, values) in enumerate(acc):
      _plot_series(ax_a, steps, values, linestyle=':', marker='s', ms=4,
                   color=_run_color(i))
    ax_a.set_ylabel('eval accuracy (dotted)')
    ax_a.set_ylim(0, 1)
  fig.tight_layout()
  return _save(fig, out)


# --- Sweeps: the runs grouped by the values of the swept fields, seeds
# averaged. ---


def _value_key(value) -> str:
  return json.dumps(value, sort_keys=True)


def _value_order(values) -> list:
  """Distinct values: in numeric order when all are numbers, else in order
  of first appearance (the sweep's)."""
  distinct = list({_value_key(v): v for v in values}.values())
  if all(isinstance(v, (int, float)) and not isinstance(v, bool)
         for v in distinct):
    return sorted(distinct)
  return distinct


def _value_colours(values) -> dict:
  """Value key -> colour: dark to light for numbers, tab10 otherwise."""
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                for v in values)
  return {_value_key(v): _early_to_late(i, len(values)) if numeric and
          len(values) > 2 else _run_color(i) for i, v in enumerate(values)}


def _facets(values, others, names) -> list[tuple[str, list[int]]]:
  """(label, run indices) for each combination of the `others` fields'
  values, in order of first appearance."""
  facets = {}
  for i, v in enumerate(values):
    key = tuple(_value_key(v.get(f)) for f in others)
    label = ', '.join(f'{names[f]}={_show(v.get(f))}' for f in others)
    facets.setdefault(key, (label or 'all runs', []))[1].append(i)
  return list(facets.values())


def _show(value) -> str:
  return value if isinstance(value, str) else json.dumps(value)


def _mean_band(ax, curves, color):
  """The mean of several (steps, values) curves at each step (the runs
  that logged it, finite values only) as a line, their min to max as a
  band."""
  at = {}
  for steps, ys in curves:
    for s, y in zip(steps, ys):
      if math.isfinite(y):
        at.setdefault(s, []).append(y)
  steps = sorted(at)
  if not steps:
    return []
  ys = [at[s] for s in steps]
  ax.plot(steps, [sum(y) / len(y) for y in ys], color=color, linewidth=1.6)
  if len(curves) > 1:
    ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys],
                    color=color, alpha=0.2, linewidth=0)
  return [y for group in ys for y in group]


def figure_sweep_curves(runs, values, field, others, names, accuracy,
                        accuracy_label, target=None):
  """Loss (top) and accuracy (bottom) against step, colour = the value of
  `field`, one column per combination of the `others` fields; each line
  is the mean over the runs that differ only in seed, the band their min
  to max. `accuracy(run)` gives (steps, values)."""
  facets = _facets(values, others, names)
  cols = min(len(facets), 4)
  rows = math.ceil(len(facets) / cols)
  fig, axes = plt.subplots(2 * rows, cols, squeeze=False, sharex=True,
                           figsize=(4.3 * cols + 2.6, 3.2 * 2 * rows),
                           layout='constrained')
  loss_key = ('probe/loss' if all(r.series('probe/loss')[0] for r in runs)
              else 'train/loss')
  order = _value_order(v.get(field) for v in values) if field else [None]
  colours = _value_colours(order)
  losses = []
  for k, (label, members) in enumerate(facets):
    ax_l, ax_a = axes[2 * (k // cols)][k % cols], axes[
        2 * (k // cols) + 1][k % cols]
    for value in order:
      group = [i for i in members if field is None or
               _value_key(values[i].get(field)) == _value_key(value)]
      if group:
        colour = colours[_value_key(value)]
        losses += _mean_band(ax_l, [runs[i].series(loss_key)
                                    for i in group], colour)
        _mean_band(ax_a, [accuracy(runs[i]) for i in group], colour)
    _panel(ax_l, '' if len(facets) == 1 else label,
           {'probe/loss': 'probe loss (no dropout)'}.get(loss_key, loss_key),
           which='both')
    if target is not None:
      ax_a.axhline(target, color='0.4', linestyle='--', linewidth=1)
    ax_a.set_ylim(0, 1)
    _step_panel(ax_a, '', accuracy_label)
    ax_a.yaxis.label.set_fontsize(8)
  for ax in axes[:, :].flat:
    if not ax.get_lines():
      ax.set_axis_off()
  for ax in axes[0::2].flat:
    if ax.get_lines():
      _log_scale_if_positive(ax, losses)
      ax.set_ylim(*_finite_limits(losses, log=ax.get_yscale() == 'log'))
  handles = [Line2D([], [], color=colours[_value_key(v)], linewidth=3)
             for v in order]
  handles.append(matplotlib.patches.Patch(color='0.5', alpha=0.3))
  labels = [f'{names[field]}={_show(v)}' if field else 'mean over seeds'
            for v in order] + ['min to max over seeds']
  if target is not None:
    handles.append(Line2D([], [], color='0.4', linestyle='--'))
    labels.append(f'target accuracy {target:g}')
  fig.legend(handles, labels, loc='outside right center', fontsize=8)
  what = f'by {names[field]}' if field else 'over seeds'
  fig.suptitle(f'Training curves {what} (line: mean over seeds)',
               fontsize=11)
  return fig


def _finite_limits(values, log: bool):
  """y limits that hold every finite value (positive ones on a log axis),
  with a margin."""
  finite = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
  low, high = min(finite), max(finite)
  if log:
    return low / 1.15, high * 1.15
  pad = 0.05 * (high - low or abs(high) or 1)
  return low - pad, high + pad


def figure_sweep_finals(values, finals, field, others, names):
  """One panel per (title, value per run, log axis) of `finals` against
  the values of `field`: a dot per run, and per combination of the
  `others` fields (colour) the mean over seeds ± their std (ddof=1)."""
  facets = _facets(values, others, names)
  order = _value_order(v.get(field) for v in values) if field else [None]
  fig, axes = plt.subplots(
      1, len(finals), squeeze=False, layout='constrained',
      figsize=(max(3.4, 1.1 * len(order) + 2) * len(finals) + 2.6, 4.4))
  width = min(0.3, 0.6 / len(facets))
  for ax, (title, per_run, log) in zip(axes[0], finals):
    drawn, filled = [], set()
    for k, (label, members) in enumerate(facets):
      offset = (k - (len(facets) - 1) / 2) * width
      colour = _run_color(k)
      means = []
      for j, value in enumerate(order):
        ys = [per_run[i] for i in members
              if (field is None or _value_key(values[i].get(field))
                  == _value_key(value)) and per_run[i] is not None
              and math.isfinite(per_run[i])]
        if not ys:
          continue
        # The runs just left of their mean, where the diamond hides none.
        ax.plot([j + offset - 0.3 * width] * len(ys), ys, 'o', ms=4,
                color=colour, alpha=0.5, markeredgewidth=0)
        mean = sum(ys) / len(ys)
        std = float(np.std(ys, ddof=1)) if len(ys) > 1 else 0.0
        ax.errorbar([j + offset], [mean], yerr=[[min(std, mean * 0.999)
                                                 if log else std], [std]],
                    fmt='D', ms=6, color=colour, capsize=4)
        means.append((j + offset, mean))
        drawn += ys
        filled.add(j)
      if len(means) > 1:
        ax.plot(*zip(*means), color=colour, linewidth=1, alpha=0.7)
    for j in set(range(len(order))) - filled:
      ax.text(j, 0.03, 'no run has a value', ha='center', fontsize=8,
              color='0.4', transform=ax.get_xaxis_transform())
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([_show(v) if field else 'all runs' for v in order])
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_xlabel(names[field] if field else '')
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis='y', alpha=0.3)
    if not drawn:
      _no_data(ax, 'no run has this value')
    elif log:
      _log_scale_if_positive(ax, drawn)
  if len(facets) > 1:
    fig.legend([Line2D([], [], color=_run_color(k), marker='D',
                       linestyle='-') for k in range(len(facets))],
               [label for label, _ in facets], loc='outside right center',
               fontsize=8)
  what = f'by {names[field]}' if field else 'over seeds'
  fig.suptitle(f'Final values {what} (dots: runs; diamonds: mean ± std '
               'over seeds)', fontsize=11)
  return fig


def _file_part(name: str) -> str:
  return ''.join(c if c.isalnum() or c in '-_' else '_' for c in name)


def draw_sweep_figures(runs, values, finals, fields, names, out_dir, *,
                       accuracy, accuracy_label,
                       target=None) -> list[pathlib.Path]:
  """For each field of `fields` (the swept ones but seed), curves_by_<field>
  and final_by_<field>.png in `out_dir` (curves_over_seeds and
  final_over_seeds without one); see figure_sweep_curves and
  figure_sweep_finals. `values`: each run's swept values; `names`: the
  fields' short names."""
  out_dir = pathlib.Path(out_dir)
  paths = []
  for field in fields or [None]:
    others = [f for f in fields if f != field]
    part = f'by_{_file_part(names[field])}' if field else 'over_seeds'
    fig = figure_sweep_curves(runs, values, field, others, names, accuracy,
                              accuracy_label, target)
    paths.append(_save(fig, out_dir / f'curves_{part}.png'))
    fig = figure_sweep_finals(values, finals, field, others, names)
    paths.append(_save(fig, out_dir / f'final_{part}.png'))
  return paths


def main(argv=None) -> int:
  parser = ArgumentParser(prog='python -m cnn_lab.plots',
                          description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  one = sub.add_parser('run', help="one run's figures")
  one.add_argument('workdir')
  one.add_argument('--out', default=None,
                   help='folder for the PNGs (default: WORKDIR/plots)')
  comp = sub.add_parser('compare', help='several runs on shared axes')
  comp.add_argument('workdirs', nargs='+')
  comp.add_argument('--out', required=True,
                    help='a folder (every figure) or FILE.png (overview)')
  flow = sub.add_parser('gradient_flow', help="one run's gradient flow")
  flow.add_argument('workdir')
  flow.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  try:
    if args.command == 'run':
      paths = (plot_comparisons([args.workdir], args.out) if args.out
               else plot_run(args.workdir))
    elif args.command == 'compare' and args.out.lower().endswith('.png'):
      paths = [plot_compare(args.workdirs, args.out)]
    elif args.command == 'compare':
      paths = plot_comparisons(args.workdirs, args.out)
    else:
      paths = [plot_gradient_flow(args.workdir, args.out)]
  except (ConfigError, OSError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  for path in paths:
    print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())

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
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from cnn_lab.errors import ArgumentParser, ConfigError  # noqa: E402
from cnn_lab.writers import read_metrics  # noqa: E402

WEIGHT_KINDS = ('conv', 'dense')
# The usual rule of thumb: an update of about 1e-3 of the weights per step.
UPDATE_RATIO_REFERENCE = 1e-3
DPI = 110


def to_float(value) -> float:
  """A logged number as a float: "nan"/"inf" strings parse, anything that is
  not a number (a layer name, null) is nan."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


class RunFiles:
  """What one workdir holds: config, layers and activation sites (forward
  order), metric lines."""

  def __init__(self, workdir):
    self.workdir = pathlib.Path(workdir)
    for name in ('config.json', 'layers.json', 'metrics.jsonl'):
      if not (self.workdir / name).is_file():
        raise ConfigError(
            f'{self.workdir} is not a cnn_lab run: it has no {name}')
    self.config = self._read_json('config.json', dict)
    self.layers = [l for l in self._read_json('layers.json', list)
                   if isinstance(l, dict) and 'name' in l]
    # Older runs have no activations.json: their sites come from the keys.
    self.activations = []
    if (self.workdir / 'activations.json').is_file():
      self.activations = [a for a in self._read_json('activations.json', list)
                          if isinstance(a, dict) and 'name' in a]
    try:
      lines = read_metrics(self.workdir)
    except UnicodeDecodeError as e:
      raise ConfigError(f'{self.workdir / "metrics.jsonl"} is not text: {e}')
    self.lines = [l for l in lines
                  if isinstance(l, dict) and isinstance(l.get('step'), int)]

  def _read_json(self, name, kind):
    try:
      obj = json.loads((self.workdir / name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConfigError(f'{self.workdir / name} is not valid JSON: {e}')
    if not isinstance(obj, kind):
      raise ConfigError(f'{self.workdir / name} does not hold a JSON '
                        f'{"object" if kind is dict else "list"}')
    return obj

  @property
  def name(self) -> str:
    return str(self.config.get('name') or self.workdir.name)

  @property
  def weight_layers(self) -> list[str]:
    """Convolution and dense layers: the depth axis of gradient-flow plots."""
    return [l['name'] for l in self.layers if l.get('kind') in WEIGHT_KINDS]

  def _names_in_keys(self, prefixes) -> list[str]:
    """Names after `prefix/` in the training lines, in the order logged."""
    names = {}
    for line in self.train_lines():
      for key in line:
        prefix, _, name = key.partition('/')
        if prefix in prefixes and name:
          names.setdefault(name)
    return list(names)

  @property
  def bn_layers(self) -> list[str]:
    """Layers with running-statistics gaps logged, in forward order."""
    logged = self._names_in_keys(('bn_mean_gap', 'bn_var_gap'))
    order = [l['name'] for l in self.layers]
    return merge_order([[n for n in order if n in logged], logged])

  @property
  def sites(self) -> list[str]:
    """Activation sites in forward order (activations.json, else the keys)."""
    logged = self._names_in_keys(
        ('act_mean', 'act_std', 'act_saturated', 'act_dead'))
    return merge_order([[a['name'] for a in self.activations], logged])

  def train_lines(self) -> list[dict]:
    return [l for l in self.lines if 'train/loss' in l]

  def series(self, key: str) -> tuple[list[int], list[float]]:
    pairs = [(l['step'], to_float(l[key])) for l in self.lines if key in l]
    return [p[0] for p in pairs], [p[1] for p in pairs]

  def last(self, key: str):
    """The last logged value of `key` (as written), or None."""
    for line in reversed(self.lines):
      if key in line:
        return line[key]
    return None

  def has(self, prefix: str) -> bool:
    return any(k.startswith(prefix) for l in self.train_lines() for k in l)


def load_runs(workdirs) -> list[RunFiles]:
  """The runs, each checked to have at least one training line."""
  if not workdirs:
    raise ConfigError('no run folders given')
  runs = [RunFiles(w) for w in workdirs]
  for run in runs:
    if not run.train_lines():
      raise ConfigError(f'{run.workdir} has no training lines in '
                        'metrics.jsonl yet (did the run log a step?)')
  return runs


def merge_order(name_lists) -> list[str]:
  """The union of several forward-ordered name lists: a name new to the
  merged list goes after the name before it in its own list."""
  merged = []
  for names in name_lists:
    names = list(names)
    pos = 0
    for name in names:
      if name in merged:
        pos = merged.index(name) + 1
        continue
      # Past names only other lists have (another branch), so that the
      # earlier lists keep their order.
      while pos < len(merged) and merged[pos] not in names:
        pos += 1
      merged.insert(pos, name)
      pos += 1
  return merged


def _pick_lines(lines: list[dict], count: int) -> list[dict]:
  """Up to `count` lines spread evenly from first to last."""
  if len(lines) <= count:
    return lines
  if count == 1:
    return lines[-1:]
  idx = sorted({round(i * (len(lines) - 1) / (count - 1))
                for i in range(count)})
  return [lines[i] for i in idx]


def _step_styles(runs, labels, num_points: int = 4):
  """(run index, line, style kwargs) for "a value per layer at several steps".

  One run: `num_points` steps, coloured early (dark) to late (yellow). Several
  runs: colour = run, and the first, middle and last step dotted, dashed and
  solid.
  """
  if len(runs) == 1:
    picked = _pick_lines(runs[0].train_lines(), num_points)
    cmap = plt.get_cmap('viridis')
    for i, line in enumerate(picked):
      yield 0, line, dict(color=cmap(0.9 * i / max(len(picked) - 1, 1)),
                          linestyle='-', label=f'step {line["step"]}')
    return
  for r, (run, label) in enumerate(zip(runs, labels)):
    picked = _pick_lines(run.train_lines(), 3)
    styles = [':', '--', '-'][-len(picked):]
    for line, style in zip(picked, styles):
      yield r, line, dict(color=_run_color(r), linestyle=style,
                          label=f'{label}, step {line["step"]}')


def _run_color(i: int):
  return plt.get_cmap('tab10')(i % 10)


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


def _readable_log_ticks(ax):
  """Plain numbers (2.3, not 2.3x10^0) on a log axis that spans less than
  about a decade, as losses often do."""
  bottom, top = ax.get_ylim()
  if ax.get_yscale() == 'log' and 0 < bottom and top / bottom < 20:
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


def _suptitle(fig, what, runs):
  fig.suptitle(f'{what}: {", ".join(r.name for r in runs)}', fontsize=11)


def _per_layer(line, prefix, names):
  """Values of `prefix/<name>` for each name; None where not logged."""
  return [line.get(f'{prefix}/{n}') for n in names]


def _depth_lines(ax, runs, labels, names, prefix, num_points=4):
  """`prefix/<layer>` against depth at several steps, each run on the shared
  axis `names` (a layer a run lacks has no point). Returns the special
  points for `_mark_zeros`."""
  zeros = []
  for _, line, style in _step_styles(runs, labels, num_points):
    values = _per_layer(line, prefix, names)
    xs = [i for i, v in enumerate(values) if v is not None]
    if not xs:
      continue
    ls = style.pop('linestyle')
    _plot_depth_series(ax, [values[i] for i in xs], zeros, ls, xs=xs,
                       **style)
  return zeros


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
  # Bars: one slot per run in each layer; max |g| pale behind mean |g|.
  width = 0.8 / len(runs)
  zeros = []
  for r, (run, label) in enumerate(zip(runs, labels)):
    line = _last_finite_line(run, names)
    color = _run_color(r)
    offset = (r - (len(runs) - 1) / 2) * width
    who = f'{label}, ' if len(runs) > 1 else ''
    for prefix, alpha, what in (('grad_max_abs', 0.35, 'max |g|'),
                                ('grad_mean_abs', 1.0, 'mean |g|')):
      values = _per_layer(line, prefix, names)
      xs = [i + offset for i, v in enumerate(values) if v is not None]
      ys = [to_float(v) for v in values if v is not None]
      if not xs:
        continue
      ax_b.bar(xs, [y if 0 < y < math.inf else 0 for y in ys], width,
               color=color, alpha=alpha,
               label=f'{who}{what} at step {line["step"]}')
      _remember_special(zeros, xs, ys, color)
  ax_b.set_ylabel('|gradient| (mean: solid, max: pale)')
  ax_b.set_title('Gradient magnitude per layer at the last logged step '
                 '(with finite gradients)', fontsize=10)
  ax_b.grid(True, which='both', axis='y', alpha=0.3)
  if _has_positive(ax_b):
    ax_b.set_yscale('log')
    _mark_zeros(ax_b, zeros)
    _legend(ax_b)
  else:
    _no_data(ax_b, 'no mean/max |g| logged (older run)' if not zeros else
             'no positive finite gradient at the last step')
  # Lines: the gradient L2 norm per layer at several steps.
  zeros = _depth_lines(ax_l, runs, labels, names, 'grad_norm', num_points)
  _depth_axis(ax_l, names, log=_has_positive(ax_l))
  _mark_zeros(ax_l, zeros)
  ax_l.set_ylabel('gradient L2 norm')
  ax_l.set_title('Gradient L2 norm per layer at several steps', fontsize=10)
  _legend(ax_l)
  _suptitle(fig, 'Gradient flow', runs)
  return fig


def figure_grad_heatmap(runs, labels):
  """log10 gradient L2 norm, weight layer (rows, input at top) x logged step
  (columns), one panel per run on one colour scale."""
  names = merge_order(r.weight_layers for r in runs)
  grids = []  # Per run: its lines, which cells were logged, their values.
  for run in runs:
    lines = run.train_lines()
    keys = [[f'grad_norm/{n}' in l for l in lines] for n in names]
    values = [[to_float(l.get(f'grad_norm/{n}')) for l in lines]
              for n in names]
    grids.append((lines, np.array(keys, bool).reshape(len(names), -1),
                  np.array(values, float).reshape(len(names), -1)))
  finite = np.concatenate([v[np.isfinite(v) & (v > 0)]
                           for _, _, v in grids])
  if not finite.size:
    return None
  vmin, vmax = np.log10(finite.min()), np.log10(finite.max())
  if vmax - vmin < 1e-6:
    vmin, vmax = vmin - 0.5, vmax + 0.5
  # Black: exactly zero; magenta: not finite; grey: not logged (a layer
  # this run does not have).
  cmap = plt.get_cmap('viridis').with_extremes(under='black', over='magenta',
                                                bad='0.85')
  fig, axes = plt.subplots(
      1, len(runs), squeeze=False, sharey=True, layout='constrained',
      figsize=(3.2 + 3.8 * len(runs), max(3.5, 0.28 * len(names) + 2)))
  zero = nonfinite = False
  for ax, run, label, (lines, logged, values) in zip(axes[0], runs, labels,
                                                      grids):
    ok = np.isfinite(values) & (values > 0)
    shown = np.full(values.shape, np.nan)
    shown[ok] = np.log10(values[ok])
    shown[logged & (values == 0)] = vmin - 1
    shown[logged & ~np.isfinite(values)] = vmax + 1
    zero |= bool((logged & (values == 0)).any())
    nonfinite |= bool((logged & ~np.isfinite(values)).any())
    image = ax.imshow(np.ma.masked_invalid(shown), aspect='auto',
                      interpolation='nearest', cmap=cmap, vmin=vmin,
                      vmax=vmax)
    ticks = sorted({round(i * (len(lines) - 1) / 5)
                    for i in range(6)}) if len(lines) > 1 else [0]
    ax.set_xticks(ticks)
    ax.set_xticklabels([lines[i]['step'] for i in ticks], fontsize=7)
    ax.set_xlabel('step')
    ax.set_title(label if len(runs) > 1 else run.name, fontsize=9)
  axes[0][0].set_yticks(range(len(names)))
  axes[0][0].set_yticklabels(names, fontsize=7)
  axes[0][0].set_ylabel('layer (input at top)')
  extend = {(True, True): 'both', (True, False): 'min',
            (False, True): 'max'}.get((zero, nonfinite), 'neither')
  bar = fig.colorbar(image, ax=axes[0].tolist(), extend=extend,
                     fraction=0.05, pad=0.02)
  bar.set_label('log10 gradient L2 norm')
  notes = [n for n, on in (('black: exactly 0', zero),
                           ('magenta: not finite', nonfinite)) if on]
  title = 'Gradient L2 norm by layer and step'
  fig.suptitle(f'{title}: {", ".join(r.name for r in runs)}'
               + (f' ({"; ".join(notes)})' if notes else ''), fontsize=11)
  return fig


def _finite_positive(values) -> list[float]:
  return [v for v in values if 0 < v < math.inf]


def _plot_series(ax, steps, values, **kwargs):
  """A curve with non-finite values left as gaps."""
  ax.plot(steps, [v if math.isfinite(v) else math.nan for v in values],
          **kwargs)


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
  losses = []
  for ax, curves in ((ax_l, LOSS_CURVES), (ax_a, ACCURACY_CURVES)):
    drawn = {}
    for r, run in enumerate(runs):
      for key, what, style in curves:
        steps, values = run.series(key)
        if steps:
          _plot_series(ax, steps, values, color=_run_color(r), label=what,
                       **style)
          drawn[what] = style
          losses += values if ax is ax_l else []
    if len(runs) > 1:  # One entry per measurement, one per run.
      handles = [Line2D([], [], color='0.2', **style)
                 for style in drawn.values()] + [
                     Line2D([], [], color=_run_color(r), linewidth=3)
                     for r in range(len(runs))]
      _legend(ax, handles, list(drawn) + labels)
    else:
      _legend(ax)
  for r, run in enumerate(runs):
    first = to_float(run.last('nonfinite/first_step'))
    if math.isfinite(first):
      for ax in (ax_l, ax_a):
        ax.axvline(first, color=_run_color(r), linestyle=(0, (1, 3)))
      ax_l.text(first, 0.02, ' first non-finite step',
                color=_run_color(r), fontsize=7, rotation=90, va='bottom',
                transform=ax_l.get_xaxis_transform())
  if _finite_positive(losses):
    ax_l.set_yscale('log')
    _readable_log_ticks(ax_l)
  for ax in (ax_l, ax_a):
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax_l.set_xlabel('step')
  ax_l.set_ylabel('loss')
  ax_l.set_title('Loss', fontsize=10)
  ax_l.grid(True, which='both', alpha=0.3)
  ax_a.set_xlabel('step')
  ax_a.set_ylabel('accuracy')
  ax_a.set_ylim(0, 1)
  ax_a.set_title('Accuracy', fontsize=10)
  ax_a.grid(True, alpha=0.3)
  _suptitle(fig, 'Training curves', runs)
  return fig


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
  for _, line, style in _step_styles(runs, labels, num_points):
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
  ax_f.set_ylabel(what, fontsize=8)
  ax_f.set_ylim(-0.03, 1.03)
  ax_f.set_title('Saturated or dead units per activation site', fontsize=10)
  ax_f.grid(True, axis='y', alpha=0.3)
  if not kinds:
    _no_data(ax_f, 'no saturation or dead-unit statistics logged')
  ax_m.set_ylabel('activation mean')
  ax_m.set_title('Mean activation', fontsize=10)
  ax_m.grid(True, axis='y', alpha=0.3)
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
  zeros = _depth_lines(ax, runs, labels, names, 'update_ratio', num_points)
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


def figure_bn(runs, labels):
  """Running against batch statistics per BN layer over time (colour =
  depth, line style = run), and the probe loss in eval minus train mode."""
  if not any(r.has('bn_') or r.has('probe/bn_train_eval_gap')
             for r in runs):
    return None
  layers = merge_order(r.bn_layers for r in runs)
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), layout='constrained')
  cmap = plt.get_cmap('viridis')
  styles = ['-', '--', ':', '-.']
  depth_color = {n: cmap(0.9 * i / max(len(layers) - 1, 1))
                 for i, n in enumerate(layers)}
  for ax, prefix, what in ((axes[0], 'bn_mean_gap', 'mean'),
                           (axes[1], 'bn_var_gap', 'variance')):
    values = []
    for r, run in enumerate(runs):
      for name in layers:
        steps, ys = run.series(f'{prefix}/{name}')
        if steps:
          _plot_series(ax, steps, ys, color=depth_color[name],
                       linestyle=styles[r % len(styles)], linewidth=1.2)
          values += ys
    if _finite_positive(values) and min(v for v in values
                                        if math.isfinite(v)) >= 0:
      ax.set_yscale('log')
      _readable_log_ticks(ax)
    if not values:
      _no_data(ax, f'no bn_{prefix[3:]} logged')
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel('step')
    ax.set_ylabel(f'gap: running vs batch {what}')
    ax.set_title(f'BN {what}: running vs batch statistics', fontsize=10)
    ax.grid(True, which='both', alpha=0.3)
  with_bn = [r for r, run in enumerate(runs) if run.bn_layers]
  if len(runs) > 1 and with_bn:  # Which line style is which run.
    axes[0].legend(
        [Line2D([], [], color='0.2', linestyle=styles[r % len(styles)])
         for r in with_bn], [labels[r] for r in with_bn], fontsize=7)
  if layers:
    mappable = plt.cm.ScalarMappable(
        plt.Normalize(-0.5, len(layers) - 0.5),
        matplotlib.colors.ListedColormap([depth_color[n] for n in layers]))
    ticks = sorted({round(i * (len(layers) - 1) / 7)
                    for i in range(8)}) if len(layers) > 1 else [0]
    bar = fig.colorbar(mappable, ax=axes[:2].tolist(), ticks=ticks,
                       fraction=0.04, pad=0.01)
    bar.ax.set_yticklabels([layers[i] for i in ticks], fontsize=7)
    bar.ax.invert_yaxis()  # Input at the top, as in the heatmap.
    bar.set_label('BN layer')
  ax = axes[2]
  for r, (run, label) in enumerate(zip(runs, labels)):
    steps, ys = run.series('probe/bn_train_eval_gap')
    if steps:
      _plot_series(ax, steps, ys, color=_run_color(r), marker='o', ms=3,
                   label=label)
  if not ax.get_lines():
    _no_data(ax, 'no probe/bn_train_eval_gap logged')
  ax.axhline(0, color='0.5', linewidth=0.8)
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_xlabel('step')
  ax.set_ylabel('eval-mode minus train-mode loss')
  ax.set_title('Probe batch: eval-mode minus train-mode loss', fontsize=10)
  ax.grid(True, alpha=0.3)
  _legend(ax)
  _suptitle(fig, 'Batch norm', runs)
  return fig


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


def flatten_config(d: dict, prefix='') -> dict:
  """A nested config as {"model.norm": value, ...}."""
  flat = {}
  for k, v in d.items():
    if isinstance(v, dict):
      flat.update(flatten_config(v, f'{prefix}{k}.'))
    else:
      flat[f'{prefix}{k}'] = v
  return flat


def differing_fields(runs: list[RunFiles]) -> list[str]:
  """Dotted config fields whose values differ between the runs (not name)."""
  flats = [flatten_config(r.config) for r in runs]
  keys = sorted(set().union(*flats))
  return [k for k in keys
          if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1
          and k != 'name']


def run_labels(runs: list[RunFiles]) -> list[str]:
  """Legend labels: the config fields whose values differ between runs
  (by their last name, e.g. `norm=batch`, unless two share it)."""
  flats = [flatten_config(r.config) for r in runs]
  differing = differing_fields(runs)
  short = [k.split('.')[-1] for k in differing]
  names = [s if short.count(s) == 1 else k for k, s in zip(differing, short)]
  labels = []
  for run, flat in zip(runs, flats):
    parts = [f'{n}={flat.get(k)}' for n, k in zip(names, differing)]
    labels.append(', '.join(parts) if parts else run.workdir.name)
  if len(set(labels)) < len(labels):  # Same config twice: use the folders.
    labels = [f'{l} ({r.workdir.name})' for l, r in zip(labels, runs)]
  return labels


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
  zeros = []
  for i, (run, label) in enumerate(zip(runs, labels)):
    lines = run.train_lines()
    for line, style in ((lines[0], '--'), (lines[-1], '-')):
      values = _per_layer(line, 'grad_norm', names)
      xs = [j for j, v in enumerate(values) if v is not None]
      _plot_depth_series(ax_g, [values[j] for j in xs], zeros, style, xs=xs,
                         color=_run_color(i),
                         label=f'{label}, step {line["step"]}')
    steps, losses = run.series('train/loss')
    _plot_series(ax_l, steps, losses, color=_run_color(i), label=label)
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

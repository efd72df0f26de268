"""Figures drawn from the files a run wrote (never from live objects), so
they work on any finished or crashed run.

  python -m cnn_lab.plots gradient_flow WORKDIR [--out FILE.png]
  python -m cnn_lab.plots compare WORKDIR [WORKDIR ...] --out FILE.png
"""

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from cnn_lab.writers import read_metrics  # noqa: E402

WEIGHT_KINDS = ('conv', 'dense')


class RunFiles:
  """What one workdir holds: config, layers (forward order), metric lines."""

  def __init__(self, workdir):
    self.workdir = pathlib.Path(workdir)
    for name in ('config.json', 'layers.json', 'metrics.jsonl'):
      if not (self.workdir / name).exists():
        raise FileNotFoundError(
            f'{self.workdir} is not a cnn_lab run: it has no {name}')
    self.config = json.loads((self.workdir / 'config.json').read_text())
    self.layers = json.loads((self.workdir / 'layers.json').read_text())
    self.lines = read_metrics(self.workdir)

  @property
  def weight_layers(self) -> list[str]:
    """Convolution and dense layers: the depth axis of gradient-flow plots."""
    return [l['name'] for l in self.layers if l['kind'] in WEIGHT_KINDS]

  def train_lines(self) -> list[dict]:
    return [l for l in self.lines if 'train/loss' in l]

  def series(self, key: str) -> tuple[list[int], list[float]]:
    pairs = [(l['step'], float(l[key])) for l in self.lines if key in l]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _pick_lines(lines: list[dict], count: int) -> list[dict]:
  """Up to `count` lines spread evenly from first to last."""
  if len(lines) <= count:
    return lines
  idx = sorted({round(i * (len(lines) - 1) / (count - 1))
                for i in range(count)})
  return [lines[i] for i in idx]


def _plot_depth_series(ax, values, zeros, style='-', **kwargs):
  """Plots per-layer values on a log axis. Exact zeros (layers that got no
  gradient at all) cannot be drawn there: they are remembered in `zeros` and
  marked at the bottom of the axis by `_mark_zeros`."""
  values = [float(v) for v in values]
  ax.plot(range(len(values)), [v if v > 0 else float('nan') for v in values],
          style, marker='o', ms=3, **kwargs)
  zeros.extend((i, kwargs.get('color')) for i, v in enumerate(values)
               if v == 0)


def _mark_zeros(ax, zeros):
  if not zeros:
    return
  bottom = ax.get_ylim()[0]
  for i, color in zeros:
    ax.plot([i], [bottom], marker='v', ms=7, color=color, clip_on=False)
  ax.text(0.01, 0.98, '▼ at the bottom: gradient exactly 0',
          transform=ax.transAxes, fontsize=7, va='top')


def _depth_axis(ax, names):
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=60, ha='right', fontsize=7)
  ax.set_xlabel('layer (input → output)')
  ax.set_yscale('log')
  ax.grid(True, which='both', axis='y', alpha=0.3)


def plot_gradient_flow(workdir, out=None, num_points: int = 4) -> pathlib.Path:
  """Per-layer gradient L2 norm against depth at a few points in training."""
  run = RunFiles(workdir)
  names = run.weight_layers
  out = pathlib.Path(out) if out else run.workdir / 'plots' / 'gradient_flow.png'
  out.parent.mkdir(parents=True, exist_ok=True)
  fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(names) + 2), 4.5))
  picked = _pick_lines(run.train_lines(), num_points)
  cmap = plt.get_cmap('viridis')
  zeros = []
  for i, line in enumerate(picked):
    _plot_depth_series(ax, [line[f'grad_norm/{n}'] for n in names], zeros,
                       color=cmap(i / max(len(picked) - 1, 1)),
                       label=f'step {line["step"]}')
  _depth_axis(ax, names)
  _mark_zeros(ax, zeros)
  ax.set_ylabel('gradient L2 norm')
  ax.set_title(f'Gradient flow: {run.config.get("name", run.workdir.name)}')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def _flatten(d: dict, prefix='') -> dict:
  flat = {}
  for k, v in d.items():
    if isinstance(v, dict):
      flat.update(_flatten(v, f'{prefix}{k}.'))
    else:
      flat[f'{prefix}{k}'] = v
  return flat


def run_labels(runs: list[RunFiles]) -> list[str]:
  """Legend labels: the config fields whose values differ between runs."""
  flats = [_flatten(r.config) for r in runs]
  keys = sorted(set().union(*flats))
  differing = [k for k in keys
               if len({json.dumps(f.get(k)) for f in flats}) > 1
               and k != 'name']
  labels = []
  for run, flat in zip(runs, flats):
    parts = [f'{k.split(".")[-1]}={flat.get(k)}' for k in differing]
    labels.append(', '.join(parts) if parts else run.workdir.name)
  if len(set(labels)) < len(labels):  # Same config twice: use the folders.
    labels = [f'{l} ({r.workdir.name})' for l, r in zip(labels, runs)]
  return labels


def plot_compare(workdirs, out) -> pathlib.Path:
  """Several runs on one figure: gradient flow by depth and the loss curves.

  Left: per-layer gradient norm at the first (dashed) and last (solid)
  logged step of each run, on a shared layer axis. Right: train loss, and
  eval accuracy where the runs evaluated.
  """
  runs = [RunFiles(w) for w in workdirs]
  labels = run_labels(runs)
  # A shared depth axis: the longest run's weight layers; runs with other
  # layer names are drawn at their own depth index.
  names = max((r.weight_layers for r in runs), key=len)
  fig, (ax_g, ax_l) = plt.subplots(
      1, 2, figsize=(max(12, 0.4 * len(names) + 8), 5),
      gridspec_kw={'width_ratios': [3, 2]})
  colors = plt.get_cmap('tab10')
  zeros = []
  for i, (run, label) in enumerate(zip(runs, labels)):
    lines = run.train_lines()
    if not lines:
      continue
    layer_names = run.weight_layers
    for line, style in ((lines[0], '--'), (lines[-1], '-')):
      _plot_depth_series(ax_g, [line[f'grad_norm/{n}'] for n in layer_names],
                         zeros, style, color=colors(i % 10),
                         label=f'{label}, step {line["step"]}')
    steps, losses = run.series('train/loss')
    ax_l.plot(steps, losses, color=colors(i % 10), label=label)
  _depth_axis(ax_g, names)
  _mark_zeros(ax_g, zeros)
  ax_g.set_ylabel('gradient L2 norm')
  ax_g.set_title('Gradient flow (dashed: first logged step, solid: last)')
  ax_g.legend(fontsize=7)
  ax_l.set_xlabel('step')
  ax_l.set_ylabel('train loss')
  ax_l.set_yscale('log')
  ax_l.grid(True, alpha=0.3)
  ax_l.set_title('Training loss')
  ax_l.legend(fontsize=7)
  acc = [(run.series('eval/accuracy'), c) for run, c in
         zip(runs, range(len(runs)))]
  if any(s[0] for s, _ in acc):
    ax_a = ax_l.twinx()
    for (steps, values), c in acc:
      ax_a.plot(steps, values, ':', marker='s', ms=4, color=colors(c % 10))
    ax_a.set_ylabel('eval accuracy (dotted)')
    ax_a.set_ylim(0, 1)
  fig.tight_layout()
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m cnn_lab.plots',
                                   description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  flow = sub.add_parser('gradient_flow', help='one run, several steps')
  flow.add_argument('workdir')
  flow.add_argument('--out', default=None)
  comp = sub.add_parser('compare', help='several runs on one figure')
  comp.add_argument('workdirs', nargs='+')
  comp.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  try:
    if args.command == 'gradient_flow':
      path = plot_gradient_flow(args.workdir, args.out)
    else:
      path = plot_compare(args.workdirs, args.out)
  except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())

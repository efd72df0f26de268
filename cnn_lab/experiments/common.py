"""What the experiments' analyses share: their sweep folders read back as
runs with values, a few numbers per run, Markdown tables and figures.
Like cnn_lab.plots, files only (sweep_tables and runs), never training code.
"""

import math
import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from cnn_lab import check  # noqa: E402
from cnn_lab import runs as runs_lib  # noqa: E402
from cnn_lab import sweep_tables  # noqa: E402

COLOURS = plt.rcParams['axes.prop_cycle'].by_key()['color']


class Entry:
  """One run of a stage: its swept values (short names) and its files."""

  def __init__(self, sweep_run: sweep_tables.SweepRun):
    self.name = sweep_run.name
    self.values = {k.split('.')[-1]: v for k, v in sweep_run.values.items()}
    self.run = sweep_run.run if sweep_run.started else None
    self.status = sweep_tables.run_status(sweep_run)

  def __getitem__(self, field):
    return self.values.get(field)

  def series(self, key):
    return self.run.series(key) if self.run else ([], [])

  def last(self, key):
    """The last finite logged value of `key`, or None."""
    _, values = self.series(key)
    finite = [v for v in values if math.isfinite(v)]
    return finite[-1] if finite else None

  def first_line(self) -> dict:
    lines = self.run.train_lines() if self.run else []
    return lines[0] if lines else {}

  def last_line(self) -> dict:
    """The last training line whose global gradient norm is finite."""
    lines = self.run.train_lines() if self.run else []
    for line in reversed(lines):
      if math.isfinite(runs_lib.to_float(line.get('grad_norm/global'))):
        return line
    return lines[-1] if lines else {}

  @property
  def layers(self) -> list[str]:
    return self.run.weight_layers if self.run else []

  def layer_values(self, line: dict, prefix: str) -> list[float]:
    return [runs_lib.to_float(line.get(f'{prefix}/{n}')) for n in self.layers]

  @property
  def diverged(self) -> bool:
    return self.status == sweep_tables.DIVERGED

  def steps(self) -> int | None:
    lines = self.run.train_lines() if self.run else []
    return lines[-1]['step'] if lines else None


def load(folder) -> list[Entry]:
  """The runs of one stage's sweep folder, in the sweep's order."""
  return [Entry(r) for r in sweep_tables.load_sweep(folder).runs]


def pick(entries, **values) -> list[Entry]:
  return [e for e in entries
          if all(e[k] == v for k, v in values.items())]


def one(entries, **values) -> Entry | None:
  found = pick(entries, **values)
  return found[0] if found else None


def num(value, digits: int = 3) -> str:
  """A table cell: None and non-finite as they are, else `digits`
  significant digits (whole numbers as they are)."""
  if value is None:
    return '–'
  if isinstance(value, str):
    return value
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, int):
    return f'{value:,}'
  if not math.isfinite(value):
    return str(value)
  return f'{value:.{digits}g}'


def acc(value) -> str:
  return '–' if value is None else f'{value:.3f}'


def table(head: list[str], rows: list[list]) -> str:
  cells = [[c if isinstance(c, str) else num(c) for c in row]
           for row in rows]
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '|'.join('---' for _ in head) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in cells]
  return '\n'.join(lines)


def figure_link(path: pathlib.Path, caption: str) -> str:
  return f'![{caption}](figures/{path.name})'


def save(fig, out_dir: pathlib.Path, name: str) -> pathlib.Path:
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f'{name}.png'
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def finite(xs, ys):
  pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def smooth(values, window: int):
  """Trailing mean over `window` values (fewer at the start)."""
  out = []
  for i in range(len(values)):
    part = [v for v in values[max(0, i - window + 1):i + 1]
            if math.isfinite(v)]
    out.append(sum(part) / len(part) if part else math.nan)
  return out


def plot_curve(ax, entry: Entry, key: str, label: str, colour=None,
               window: int = 1, **kwargs):
  steps, values = entry.series(key)
  if window > 1:
    values = smooth(values, window)
  steps, values = finite(steps, values)
  if steps:
    ax.plot(steps, values, label=label, color=colour, **kwargs)


def plot_depth(ax, entry: Entry, line: dict, prefix: str, label: str,
               colour=None, **kwargs):
  """`prefix/<layer>` over the weight layers, input to output."""
  values = entry.layer_values(line, prefix)
  xs = [i for i, v in enumerate(values) if math.isfinite(v) and v > 0]
  ax.plot(xs, [values[i] for i in xs], marker='o', markersize=3,
          label=label, color=colour, **kwargs)


def depth_axis(ax, layers: list[str], every: int = 1):
  ax.set_xticks(range(0, len(layers), every))
  ax.set_xticklabels(layers[::every], rotation=60, ha='right', fontsize=7)
  ax.set_xlabel('weight layer (input → output)')


def steps_to(entry: Entry, target: float, key: str = 'eval/accuracy'):
  """First step at which `key` reached `target`, or None."""
  for step, value in zip(*entry.series(key)):
    if math.isfinite(value) and value >= target:
      return step
  return None


def rises(values, tolerance: float = 1e-3) -> int:
  """How many logged steps the value rose by more than `tolerance` of the
  previous one (cnn_lab.check's rule)."""
  return len(check.find_rises(range(len(values)), values, tolerance))


def num_params(entry: Entry) -> int | None:
  """Parameters of the run's model, from layers.json."""
  if entry.run is None:
    return None
  return sum(int(l.get('num_params', 0)) for l in entry.run.layers)


def late_mean(entry: Entry, key: str, fraction: float = 0.2):
  """Mean of the finite logged values of `key` over the last `fraction`
  of the run's logged lines (at least one): a final value less noisy than
  the last one."""
  _, values = entry.series(key)
  values = [v for v in values if math.isfinite(v)]
  if not values:
    return None
  tail = values[-max(1, int(len(values) * fraction)):]
  return sum(tail) / len(tail)

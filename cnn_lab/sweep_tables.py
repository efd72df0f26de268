"""A sweep folder read back as tables: one row per run (its swept values,
status, final accuracies, steps to a target accuracy, the first-to-last
layer gradient-norm ratio) and one row per group of runs that differ only
in seed (mean ± std over the seeds), as CSV, Markdown and HTML.

A sweep folder holds `sweep.json` (written by `launch.py` for a config with
`get_sweep()`: the swept fields and each run's name and overrides; a run's
workdir is the folder / its name), or, without it, run folders as
sub-folders, whose swept fields are then the config fields that differ.
Like the plots, it reads only the files the runs wrote: runs that are
missing, still running, crashed or diverged are rows with their status.
"""

import csv
import dataclasses
import html
import json
import math
import pathlib
import statistics

from cnn_lab import runs as runs_lib
from cnn_lab.errors import ConfigError, check_choice

# Fields that only repeat a run: the runs that differ in them alone are
# one group of the second table, averaged over.
SEED_FIELDS = ('seed',)
# Logged lines the train accuracy is averaged over (trailing) before it is
# compared with the target, when the runs did not evaluate along the way.
SMOOTH_LINES = 5
DEFAULT_TARGET_ACCURACY = 0.8
TARGET_SOURCES = ('auto', 'eval', 'train')

# Written into a run's folder by cnn_lab.sweeps when it saw the run
# finish (not imported from there: that module reaches the training code).
DONE_FILE = 'done.json'
# Status of a run, from its files.
FINISHED = 'finished'
RUNNING = 'running-or-interrupted'
DIVERGED = 'diverged'
NO_METRICS = 'failed: no metrics'
NOT_STARTED = 'not started'

# The per-run numbers the group table averages: (key, Markdown head).
GROUPED = (('final_train_accuracy', 'train acc'),
           ('final_test_accuracy', 'test acc'),
           ('steps_to_target', 'steps to target'),
           ('grad_ratio', 'grad ratio first/last'))


@dataclasses.dataclass
class SweepRun:
  """One run of the sweep: its name, folder, swept values, and its files
  (None when the folder is absent or not a readable run)."""
  name: str
  workdir: pathlib.Path
  values: dict
  run: runs_lib.RunFiles | None

  @property
  def started(self) -> bool:
    return self.run is not None and bool(self.run.train_lines())


@dataclasses.dataclass
class Sweep:
  folder: pathlib.Path
  config: str | None  # The sweep's config file, as sweep.json names it.
  fields: list[str]  # Dotted config fields, in the sweep's order.
  runs: list[SweepRun]

  @property
  def group_fields(self) -> list[str]:
    return [f for f in self.fields if f not in SEED_FIELDS]


def is_sweep_folder(path) -> bool:
  """A folder with sweep.json, or one that is no run itself (no
  config.json) but holds run folders."""
  path = pathlib.Path(path)
  if (path / 'sweep.json').is_file():
    return True
  return path.is_dir() and not (path / 'config.json').exists() and bool(
      _run_folders(path))


def _run_folders(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in path.iterdir() if p.is_dir() and (
      (p / 'config.json').is_file() or (p / 'metrics.jsonl').is_file()))


def _read_run(workdir: pathlib.Path) -> runs_lib.RunFiles | None:
  try:
    return runs_lib.RunFiles(workdir)
  except (ConfigError, OSError):
    return None


def load_sweep(folder) -> Sweep:
  """The sweep in `folder` (see the module docstring); ConfigError when it
  holds no runs or its sweep.json cannot be read."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise ConfigError(f'{folder} is not a cnn_lab run or sweep: no such '
                      'folder')
  if (folder / 'sweep.json').exists():
    return _load_listed(folder)
  workdirs = _run_folders(folder)
  if not workdirs:
    raise ConfigError(f'{folder} is not a cnn_lab run or sweep: it has no '
                      'config.json, no sweep.json and no run folders')
  configs = [_read_config(w) for w in workdirs]
  fields = runs_lib.differing_config_fields(configs)
  flats = [runs_lib.flatten_config(c) for c in configs]
  runs = [SweepRun(w.name, w, {f: flat.get(f) for f in fields},
                   _read_run(w)) for w, flat in zip(workdirs, flats)]
  return Sweep(folder, None, fields, runs)


def _read_config(workdir: pathlib.Path) -> dict:
  try:
    config = json.loads((workdir / 'config.json').read_text())
  except (OSError, ValueError):
    return {}
  return config if isinstance(config, dict) else {}


def _load_listed(folder: pathlib.Path) -> Sweep:
  path = folder / 'sweep.json'
  try:
    spec = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path} cannot be read: {e}')
  runs = spec.get('runs') if isinstance(spec, dict) else None
  if not isinstance(runs, list) or not runs or not all(
      isinstance(r, dict) and isinstance(r.get('name'), str) and r['name']
      and isinstance(r.get('overrides', {}), dict) for r in runs):
    raise ConfigError(f'{path} cannot be read: it must be an object whose '
                      '"runs" is a non-empty list of {"name": ..., '
                      '"overrides": {...}}')
  fields = spec.get('fields')
  if not (isinstance(fields, list) and all(isinstance(f, str)
                                           for f in fields)):
    fields = list(dict.fromkeys(k for r in runs
                                for k in r.get('overrides', {})))
  config = spec.get('config')
  return Sweep(folder, config if isinstance(config, str) else None, fields, [
      SweepRun(r['name'], folder / r['name'],
               {f: r.get('overrides', {}).get(f) for f in fields},
               _read_run(folder / r['name'])) for r in runs])


# --- One run's numbers. ---


def planned_steps(run: runs_lib.RunFiles) -> int | None:
  train = run.config.get('train')
  steps = train.get('num_steps') if isinstance(train, dict) else None
  return steps if isinstance(steps, int) else None


def run_status(entry: SweepRun) -> str:
  """finished (done.json, or the planned steps logged), running-or-
  interrupted, diverged (halted on a non-finite step), failed: no metrics
  (a folder without training lines), or not started (no folder)."""
  if not entry.workdir.exists():
    return NOT_STARTED
  if not entry.started:
    return NO_METRICS
  run = entry.run
  last = max(l['step'] for l in run.lines)
  planned = planned_steps(run)
  if (run.workdir / DONE_FILE).is_file():
    finished = True
  elif planned is not None:
    finished = last >= planned
  else:  # Epochs: the length depends on the data; the run's end marks it.
    finished = any((run.workdir / 'plots').glob('*.png')) and any(
        'eval/accuracy' in l and l['step'] == last for l in run.lines)
  if finished:
    return FINISHED
  skipping = run.config.get('on_nonfinite') == 'skip'
  if run.last('nonfinite/first_step') is not None and not skipping:
    return DIVERGED
  return RUNNING


def steps_to_target(run: runs_lib.RunFiles, target: float,
                    source: str) -> int | None:
  """The first step where the accuracy reached `target`: eval/accuracy
  ('eval'), or train/accuracy averaged over the last SMOOTH_LINES logged
  lines ('train'); None if it never did."""
  steps, values = accuracy_curve(run, source)
  return next((s for s, v in zip(steps, values) if v >= target), None)


def accuracy_curve(run: runs_lib.RunFiles, source: str):
  """(steps, accuracies) that steps_to_target reads."""
  if source == 'eval':
    steps, values = run.series('eval/accuracy')
    return runs_lib.trailing_mean(steps, values, 1)
  steps, values = run.series('train/accuracy')
  return runs_lib.trailing_mean(steps, values, SMOOTH_LINES)


def grad_ratio(run: runs_lib.RunFiles):
  """(ratio, step): the first weight layer's gradient L2 norm over the
  last one's (layers.json's forward order), at the last logged line where
  both are finite and the last is not 0; (None, None) without one."""
  layers = run.weight_layers
  if len(layers) < 2:
    return None, None
  first, last = f'grad_norm/{layers[0]}', f'grad_norm/{layers[-1]}'
  for line in reversed(run.train_lines()):
    a, b = runs_lib.to_float(line.get(first)), runs_lib.to_float(
        line.get(last))
    if math.isfinite(a) and math.isfinite(b) and b != 0:
      return a / b, line['step']
  return None, None


def _finite_last(run: runs_lib.RunFiles, key: str):
  """(value, step) of the last finite value of `key`, or (None, None)."""
  steps, values = run.series(key)
  for step, value in zip(reversed(steps), reversed(values)):
    if math.isfinite(value):
      return value, step
  return None, None


def target_source(sweep: Sweep, target_on: str) -> str:
  """'eval' when asked, or (auto) when some run evaluated along the way
  (two eval lines or more); else 'train'."""
  if target_on != 'auto':
    return target_on
  along = any(len(r.run.series('eval/accuracy')[0]) >= 2
              for r in sweep.runs if r.started)
  return 'eval' if along else 'train'


def run_row(entry: SweepRun, target: float, source: str) -> dict:
  """One run's numbers (None where it has none)."""
  row = {'run': entry.name, **entry.values, 'status': run_status(entry)}
  row.update(dict.fromkeys((
      'steps', 'planned_steps', 'final_train_accuracy',
      'final_test_accuracy', 'test_accuracy_step', 'steps_to_target',
      'grad_ratio', 'grad_ratio_step', 'first_layer', 'last_layer')))
  if not entry.started:
    return row
  run = entry.run
  row['steps'] = run.train_lines()[-1]['step']
  row['planned_steps'] = planned_steps(run)
  row['final_train_accuracy'], _ = _finite_last(run, 'train/accuracy')
  row['final_test_accuracy'], row['test_accuracy_step'] = _finite_last(
      run, 'eval/accuracy')
  row['steps_to_target'] = steps_to_target(run, target, source)
  row['grad_ratio'], row['grad_ratio_step'] = grad_ratio(run)
  if len(run.weight_layers) >= 2:
    row['first_layer'], row['last_layer'] = (run.weight_layers[0],
                                             run.weight_layers[-1])
  return row


# --- Groups over seeds. ---


def mean_std(values) -> tuple:
  """(mean, std with ddof=1, n) of the finite values; std None for n < 2,
  mean None for n = 0."""
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return None, None, 0
  std = statistics.stdev(values) if len(values) > 1 else None
  return statistics.fmean(values), std, len(values)


def _key(value) -> str:
  return json.dumps(value, sort_keys=True)


def group_rows(sweep: Sweep, rows: list[dict]) -> list[dict]:
  """One row per combination of the non-seed fields (in the sweep's
  order): n runs, how many finished, and (mean, std, n) of each GROUPED
  number over the runs that have it."""
  groups = {}
  for row in rows:
    key = tuple(_key(row[f]) for f in sweep.group_fields)
    groups.setdefault(key, []).append(row)
  out = []
  for members in groups.values():
    group = {f: members[0][f] for f in sweep.group_fields}
    group['n'] = len(members)
    group['finished'] = sum(r['status'] == FINISHED for r in members)
    for key, _ in GROUPED:
      group[key] = mean_std([r[key] for r in members])
    out.append(group)
  return out


# --- Writing them. ---


def short_names(fields: list[str]) -> list[str]:
  """`model.norm` -> `norm`, unless two fields share the last name."""
  short = [f.split('.')[-1] for f in fields]
  return [s if short.count(s) == 1 else f for f, s in zip(fields, short)]


def format_field(value) -> str:
  if value is None:
    return '–'
  return value if isinstance(value, str) else json.dumps(value)


def format_number(value, kind: str) -> str:
  """A table cell: accuracies to 4 decimals, steps whole, ratios to 3
  significant digits; None is "–"."""
  if value is None:
    return '–'
  if kind == 'accuracy':
    return f'{value:.4f}'
  if kind == 'steps':
    return f'{value:.0f}' if float(value).is_integer() else f'{value:.1f}'
  return f'{value:.3g}'


KINDS = {'final_train_accuracy': 'accuracy', 'final_test_accuracy':
         'accuracy', 'steps_to_target': 'steps', 'grad_ratio': 'ratio'}


def format_group_cell(stats: tuple, members: int, kind: str) -> str:
  """mean ± std (no std for one value), with (k of n) when only k of the
  group's n runs have the number."""
  mean, std, n = stats
  if mean is None:
    return '–'
  text = format_number(mean, kind)
  if std is not None:
    text += ' ± ' + format_number(std, 'accuracy' if kind == 'accuracy'
                                  else 'ratio')
  return text + (f' ({n} of {members})' if n < members else '')


@dataclasses.dataclass
class Tables:
  """The two tables, as cell texts, with the notes that say how to read
  them, and the raw rows the CSV files hold."""
  title: str
  notes: list[str]
  run_head: list[str]
  run_cells: list[list[str]]
  group_head: list[str]
  group_cells: list[list[str]]
  run_rows: list[dict]
  group_rows: list[dict]
  fields: list[str]
  group_fields: list[str]
  target: float
  source: str  # What steps_to_target read: 'eval' or 'train'.


def make_tables(sweep: Sweep, target: float = DEFAULT_TARGET_ACCURACY,
                target_on: str = 'auto') -> Tables:
  if not (isinstance(target, (int, float)) and 0 < target <= 1):
    raise ConfigError(f'target accuracy {target!r} is not allowed; it must '
                      'be in (0, 1]')
  check_choice('target_on', target_on, TARGET_SOURCES)
  source = target_source(sweep, target_on)
  rows = [run_row(r, target, source) for r in sweep.runs]
  groups = group_rows(sweep, rows)
  names = dict(zip(sweep.fields, short_names(sweep.fields)))
  id_head = [names[f] for f in sweep.fields] or ['run']

  def ids(row, fields):
    return [format_field(row[f]) for f in fields] if sweep.fields else [
        row['run']]

  target_head = f'steps to {target:g}'
  run_head = id_head + ['status', 'steps', 'train acc', 'test acc',
                        target_head, 'grad ratio first/last']
  run_cells = []
  for row in rows:
    reached = row['steps_to_target']
    run_cells.append(ids(row, sweep.fields) + [
        row['status'], format_number(row['steps'], 'steps'),
        format_number(row['final_train_accuracy'], 'accuracy'),
        format_number(row['final_test_accuracy'], 'accuracy'),
        'not reached' if reached is None and row['steps'] else
        format_number(reached, 'steps'),
        format_number(row['grad_ratio'], 'ratio')])
  group_head = ([names[f] for f in sweep.group_fields] + ['n', 'finished']
                + [target_head if k == 'steps_to_target' else h
                   for k, h in GROUPED])
  group_cells = [[format_field(g[f]) for f in sweep.group_fields]
                 + [str(g['n']), str(g['finished'])]
                 + [format_group_cell(g[k], g['n'], KINDS[k])
                    for k, _ in GROUPED] for g in groups]
  return Tables(_title(sweep), _notes(sweep, rows, target, source), run_head,
                run_cells, group_head, group_cells, rows, groups,
                sweep.fields, sweep.group_fields, target, source)


def _title(sweep: Sweep) -> str:
  return f'Sweep {sweep.folder.name}'


def _notes(sweep, rows, target, source) -> list[str]:
  counts = {}
  for row in rows:
    counts[row['status']] = counts.get(row['status'], 0) + 1
  layers = {(r['first_layer'], r['last_layer']) for r in rows
            if r['first_layer']}
  layer_text = (f' ({", ".join(f"{a} / {b}" for a, b in sorted(layers))})'
                if layers else '')
  swept = ', '.join(sweep.fields) or 'none (the runs share their config)'
  config = f'config {sweep.config}; ' if sweep.config else ''
  if source == 'eval':
    how = (f'the first evaluation step where eval/accuracy ≥ {target:g} '
           '(the runs evaluated along the way; a step between two '
           'evaluations is not seen)')
  else:
    how = (f'the first logged step where train/accuracy, averaged over '
           f'the last {SMOOTH_LINES} logged steps, is ≥ {target:g} (the '
           'runs did not evaluate along the way)')
  return [
      f'{config}{len(rows)} runs: ' + ', '.join(
          f'{n} {s}' for s, n in counts.items()) + f'. Swept: {swept}.',
      'train acc: the last logged training batch\'s accuracy; test acc: '
      'the last eval/accuracy (the test split, or its first '
      'eval_num_examples images).',
      f'steps to {target:g}: {how}; "not reached": not within the steps '
      'done.',
      'grad ratio: the gradient L2 norm of the first weight layer over '
      f'that of the last{layer_text}, at the last logged step where both '
      'are finite: far below 1, the gradient vanishes towards the input; '
      'far above 1, it explodes.',
      'Over seeds: the runs that differ only in seed, as mean ± std '
      '(std with ddof=1; one value shows no std) over the runs that have '
      'the number, "(k of n)" when only k of the n do; every run counts, '
      'whatever its status (see finished).',
      '"–": no value (the run logged none, or has no files).']


def _markdown_table(head, cells) -> list[str]:
  escape = lambda t: str(t).replace('|', '\\|')  # noqa: E731
  lines = ['| ' + ' | '.join(escape(h) for h in head) + ' |',
           '|' + '|'.join('---' for _ in head) + '|']
  lines += ['| ' + ' | '.join(escape(c) for c in row) + ' |' for row in cells]
  return lines


def markdown(tables: Tables) -> str:
  lines = [f'# {tables.title}', '']
  lines += [f'- {n}' for n in tables.notes]
  lines += ['', '## Runs', ''] + _markdown_table(tables.run_head,
                                                 tables.run_cells)
  lines += ['', '## Over seeds', ''] + _markdown_table(tables.group_head,
                                                       tables.group_cells)
  return '\n'.join(lines) + '\n'


def html_section(tables: Tables) -> str:
  """The notes and both tables as an HTML fragment for the report."""

  def table(head, cells):
    out = ['<table><thead><tr>'] + [
        f'<th>{html.escape(h)}</th>' for h in head] + ['</tr></thead><tbody>']
    for row in cells:
      out.append('<tr>' + ''.join(f'<td>{html.escape(c)}</td>'
                                  for c in row) + '</tr>')
    return '\n'.join(out + ['</tbody></table>'])

  return '\n'.join(
      ['<h2>Sweep: one row per run</h2>', '<ul>']
      + [f'<li>{html.escape(n)}</li>' for n in tables.notes] + ['</ul>',
         table(tables.run_head, tables.run_cells),
         '<h2>Sweep: over seeds</h2>',
         table(tables.group_head, tables.group_cells)])


def _csv_value(value):
  if value is None:
    return ''
  return value if isinstance(value, (str, int, float)) and not isinstance(
      value, bool) else json.dumps(value)


def write_csv(path: pathlib.Path, columns: list[str], rows: list[dict]):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow([_csv_value(row.get(c)) for c in columns])
  return path


def write_tables(tables: Tables, out_dir) -> list[pathlib.Path]:
  """sweep.csv (one row per run), sweep_groups.csv (one per group) and
  sweep.md (both, with the notes) in `out_dir`."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  run_columns = (['run'] + tables.fields + [
      'status', 'steps', 'planned_steps', 'final_train_accuracy',
      'final_test_accuracy', 'test_accuracy_step', 'target_accuracy',
      'target_on', 'steps_to_target', 'grad_ratio', 'grad_ratio_step',
      'first_layer', 'last_layer'])
  runs = [dict(r, target_accuracy=tables.target, target_on=tables.source)
          for r in tables.run_rows]
  group_columns = tables.group_fields + ['n', 'finished'] + [
      f'{k}_{s}' for k, _ in GROUPED for s in ('mean', 'std', 'n')]
  groups = [dict(g, **{f'{k}_{s}': v for k, _ in GROUPED
                       for s, v in zip(('mean', 'std', 'n'), g[k])})
            for g in tables.group_rows]
  md = out_dir / 'sweep.md'
  md.write_text(markdown(tables), encoding='utf-8')
  return [write_csv(out_dir / 'sweep.csv', run_columns, runs),
          write_csv(out_dir / 'sweep_groups.csv', group_columns, groups), md]

"""One self-contained HTML page on one or several runs: the config fields
that differ between them, their final metrics, and every figure of
`cnn_lab.plots` drawn for all of them on shared axes, each with a sentence
on how to read it.

  python -m cnn_lab.report WORKDIR [WORKDIR ...] --out report.html
  python -m cnn_lab.report SWEEP [--target-accuracy 0.8] [--out FILE.html]

A sweep folder (`sweep.json` with its runs as sub-folders, or any folder of
run folders) gets its tables first (`cnn_lab.sweep_tables`: SWEEP/sweep.csv,
sweep_groups.csv and sweep.md, one row per run and one per group of seeds)
and figures grouped by the swept fields (SWEEP/plots/curves_by_<field>.png,
final_by_<field>.png), then SWEEP/report.html: the tables, those figures
and the report below over every run that logged a step.

The figures are embedded as base64 PNGs and the CSS is inline, so the page
needs no other file, no network and no JavaScript: mail it or archive it as
it is. Like the plots it reads only the files a run wrote, so it works on
finished, crashed and older runs (what a run did not log shows as "–").
Exit status 2 with one `error: ...` line when a folder is not a run or has
no training lines yet.
"""

import base64
import datetime
import html
import json
import math
import os
import pathlib
import sys
import tempfile

from cnn_lab import plots
from cnn_lab import runs as runs_lib
from cnn_lab import sweep_tables
from cnn_lab.errors import ArgumentParser, ConfigError

# One sentence per figure: how to read it.
CAPTIONS = {
    'gradient_flow':
        'Top: mean (solid) and max (pale) absolute gradient of each weight '
        'layer at the last logged step (the last finite one, if the run '
        'went nan); bottom: each layer\'s gradient L2 '
        'norm at several steps, input on the left — a norm that falls by '
        'orders of magnitude towards the input is a vanishing gradient, '
        '▼ marks a layer whose gradient is exactly zero and ▲ one that is '
        'not finite.',
    'grad_heatmap':
        'Rows are weight layers (input at the top), columns logged steps, '
        'colour the log10 gradient L2 norm on one scale for all runs: dark '
        'rows at the top mean the gradient vanishes before it reaches the '
        'input, black cells are exact zeros, magenta cells nan or inf.',
    'curves':
        'Loss (left, log scale) and accuracy (right) against step, colour = '
        'run: solid lines are the training batch, dashed the fixed probe '
        'batch without dropout (dash-dot: the same in eval mode, with batch '
        'norm), squares the test subset — a loss flat at ln 10 ≈ 2.30 is a '
        'network that predicts one class.',
    'activations':
        'Per activation site (input on the left) at several steps: the '
        'fraction of saturated tanh/sigmoid units or dead ReLU channels, '
        'then the mean and standard deviation of the activations — a '
        'fraction near 1 means the site lets almost no gradient through.',
    'update_ratio':
        'Size of each weight layer\'s actual update relative to its weights '
        '(‖Δw‖/‖w‖) at several steps; the dashed line is the usual 1e-3 '
        'rule of thumb: far below it a layer barely learns, far above it '
        'training is unstable.',
    'bn':
        'Gap between each batch-norm layer\'s running statistics and the '
        'current batch\'s (mean left, variance middle; colour = depth, line '
        'style = run) over training, and the probe loss in eval mode minus '
        'train mode (right) — a large or growing gap means the network '
        'evaluated is not the one trained.',
}
# Why a figure can be missing: what no run logged.
MISSING = {
    'grad_heatmap': 'no run logged a positive finite gradient norm',
    'activations': 'no run logged activation statistics (act_*; older runs '
                   'do not)',
    'update_ratio': 'no run logged update ratios (older runs do not)',
    'bn': 'no run logged batch-norm statistics (no batch norm, or an older '
          'run)',
}

CSS = """
body { font-family: sans-serif; color: #222; background: #fff;
       max-width: 1180px; margin: 1em auto; padding: 0 10px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
p.meta { color: #666; margin-top: 0; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left;
         vertical-align: top; }
thead th { background: #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th small, td small { color: #666; font-weight: normal; }
figure { margin: 1.2em 0 2em 0; }
figure img { display: block; max-width: 100%; height: auto;
             border: 1px solid #ddd; }
figcaption { margin-top: 0.4em; font-size: 0.9em; color: #333; }
details { margin: 0.5em 0; }
code { font-size: 0.95em; }
"""


def format_value(value) -> str:
  """A config or metric value as it reads in a table cell."""
  if value is None:
    return '–'
  if isinstance(value, bool) or isinstance(value, str):
    return str(value)
  if isinstance(value, int):
    return f'{value:,}' if abs(value) >= 10000 else str(value)
  if isinstance(value, float):
    return f'{value:.4g}' if math.isfinite(value) else str(value)
  return json.dumps(value)


def final_metrics(runs: list[runs_lib.RunFiles]) -> list[tuple[str, list]]:
  """(row title, one value per run) for the final-metrics table; the rows
  that only some runs can have (batch norm, non-finite) only when one has."""
  rows = []

  def steps_run(run):
    step = run.train_lines()[-1]['step']
    train = run.config.get('train')
    planned = train.get('num_steps') if isinstance(train, dict) else None
    return f'{step} of {planned}' if isinstance(planned, int) else step

  def last_number(key):
    return [None if r.last(key) is None else runs_lib.to_float(r.last(key))
            for r in runs]

  def eval_step(run):
    steps, _ = run.series('eval/accuracy')
    return steps[-1] if steps else None

  rows.append(('steps run', [steps_run(r) for r in runs]))
  rows.append(('parameters', [
      sum(l['num_params'] for l in r.layers
          if isinstance(l.get('num_params'), int)) or None for r in runs]))
  rows.append(('eval accuracy (last)', last_number('eval/accuracy')))
  rows.append(('eval loss (last)', last_number('eval/loss')))
  rows.append(('last eval at step', [eval_step(r) for r in runs]))
  rows.append(('train loss (last)', last_number('train/loss')))
  rows.append(('probe loss (last)', last_number('probe/loss')))
  gap = last_number('probe/bn_train_eval_gap')
  if any(v is not None for v in gap):
    rows.append(('BN: probe loss, eval minus train mode (last)', gap))
  def nonfinite(run):
    step = run.last('nonfinite/first_step')
    if step is None:
      return None
    site = run.last('nonfinite/first_activation')
    layer = run.last('nonfinite/first_grad_layer')
    where = ([f'forward at {site}'] if site is not None else []) + (
        [f'backward at {layer}'] if layer is not None else [])
    return f'step {step}: ' + (', '.join(where) or
                               'global gradient norm overflowed')

  started = [nonfinite(r) for r in runs]
  if any(v is not None for v in started):
    rows.append(('non-finite values started', started))
  return rows


def _cell(value) -> str:
  cls = ' class="num"' if isinstance(value, (int, float)) and not \
      isinstance(value, bool) else ''
  return f'<td{cls}>{html.escape(format_value(value))}</td>'


def _table(head: list[str], rows) -> str:
  """An HTML table: `head` is raw HTML per column, rows (title, values)."""
  out = ['<table><thead><tr><th></th>']
  out += [f'<th>{h}</th>' for h in head]
  out.append('</tr></thead><tbody>')
  for title, values in rows:
    out.append(f'<tr><th>{html.escape(title)}</th>'
               + ''.join(_cell(v) for v in values) + '</tr>')
  out.append('</tbody></table>')
  return '\n'.join(out)


def _run_heads(runs, labels) -> list[str]:
  """Column heads: run name, its legend label in the figures, its folder."""
  heads = []
  for run, label in zip(runs, labels):
    parts = [html.escape(run.name)]
    if len(runs) > 1:
      parts.append(f'<small>legend: {html.escape(label)}</small>')
    parts.append(f'<small><code>{html.escape(str(run.workdir))}</code>'
                 '</small>')
    heads.append('<br>'.join(parts))
  return heads


def _config_section(runs, heads) -> str:
  flats = [runs_lib.flatten_config(r.config) for r in runs]
  if len(runs) == 1:
    return ('<h2>Config</h2>\n' + _table(
        heads, [(k, [flats[0][k]]) for k in sorted(flats[0])]))
  differing = runs_lib.differing_fields(runs)
  parts = ['<h2>Config fields that differ</h2>']
  if differing:
    parts.append(_table(heads, [(k, [f.get(k) for f in flats])
                                for k in differing]))
  else:
    parts.append('<p>None: the runs have the same config.</p>')
  shared = sorted(set().union(*flats) - set(differing) - {'name'})
  parts.append(f'<details><summary>The {len(shared)} fields all runs share'
               '</summary>\n' + _table(
                   ['value'], [(k, [flats[0].get(k)]) for k in shared])
               + '</details>')
  return '\n'.join(parts)


def _figure(name: str, png: pathlib.Path, caption: str | None = None) -> str:
  data = base64.b64encode(png.read_bytes()).decode('ascii')
  title = name.replace('_', ' ')
  caption = CAPTIONS[name] if caption is None else caption
  return (f'<figure id="{name}">\n'
          f'<img src="data:image/png;base64,{data}" alt="figure: {title}">\n'
          f'<figcaption><b>{html.escape(title.capitalize())}.</b> '
          f'{html.escape(caption)}</figcaption>\n</figure>')


def write_report(workdirs, out, verbose: bool = False, *, title=None,
                 top=()) -> pathlib.Path:
  """Writes the HTML page for `workdirs` to `out`; returns its path.
  `title` replaces the run names in the heading, `top` is HTML put before
  the config section (a sweep's tables)."""
  say = print if verbose else (lambda *a, **k: None)
  runs = runs_lib.load_runs(workdirs)
  say(f'[report] {len(runs)} run(s): {", ".join(r.name for r in runs)}',
      flush=True)
  labels = plots.legend_labels(runs)
  heads = _run_heads(runs, labels)
  names = title or ', '.join(r.name for r in runs)
  body = [f'<h1>cnn_lab report: {html.escape(names)}</h1>',
          f'<p class="meta">{len(runs)} run(s), written '
          f'{datetime.datetime.now():%Y-%m-%d %H:%M} by '
          '<code>python -m cnn_lab.report</code> from the files each run '
          'wrote.</p>',
          *top,
          _config_section(runs, heads),
          '<h2>Final metrics</h2>',
          _table(heads, final_metrics(runs)),
          '<h2>Figures</h2>']
  with tempfile.TemporaryDirectory() as tmp:
    say('[report] drawing figures', flush=True)
    pngs = {p.stem: p for p in plots.draw_figures(runs, tmp)}
    for name in plots.FIGURES:
      if name in pngs:
        say(f'[report]   {name}', flush=True)
        body.append(_figure(name, pngs[name]))
    skipped = [n for n in plots.FIGURES if n not in pngs]
  if skipped:
    body.append('<p>Not drawn: ' + '; '.join(
        f'{n.replace("_", " ")} ({html.escape(MISSING.get(n, "no data"))})'
        for n in skipped) + '.</p>')
  page = ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">'
          f'\n<title>cnn_lab report: {html.escape(names)}</title>\n'
          f'<style>{CSS}</style>\n</head>\n<body>\n' + '\n'.join(body)
          + '\n</body>\n</html>\n')
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f'.{out.name}.tmp')  # Atomic: never half a page.
  tmp.write_text(page, encoding='utf-8')
  os.replace(tmp, out)
  say(f'[report] wrote {out} ({out.stat().st_size / 1024:.0f} KiB, '
      f'{len(pngs)} figures)', flush=True)
  return out


# The sweep figures' captions, by the PNG's stem before "_by_".
SWEEP_CAPTIONS = {
    'curves':
        'Loss (top, log scale) and accuracy (bottom) against step, colour '
        '= the value of the field named in the title, one column per '
        'combination of the other swept fields: the line is the mean over '
        'the runs that differ only in seed, the band their min to max; '
        'the dashed line is the target accuracy of the tables.',
    'final':
        'The tables\' numbers against the values of the field named in '
        'the title: a dot per run, a diamond per combination of the other '
        'swept fields (colour) at the mean over seeds with ± one standard '
        'deviation (ddof=1); a ratio of first- to last-layer gradient norm '
        'far below 1 is a vanishing gradient.',
}


def _sweep_finals(tables) -> list[tuple[str, list, bool]]:
  """(panel title, value per started run, log axis) for the final-values
  figures: test accuracy (train where no run evaluated), steps to the
  target, gradient-norm ratio."""
  rows = [r for r in tables.run_rows if r['steps'] is not None]
  test = [r['final_test_accuracy'] for r in rows]
  if all(v is None for v in test):
    accuracy = ('final train accuracy',
                [r['final_train_accuracy'] for r in rows], False)
  else:
    accuracy = ('final test accuracy', test, False)
  return [accuracy,
          (f'steps to accuracy {tables.target:g}',
           [r['steps_to_target'] for r in rows], False),
          ('gradient norm, first / last weight layer',
           [r['grad_ratio'] for r in rows], True)]


def _sweep_figures(sweep, tables, out_dir) -> list[pathlib.Path]:
  started = [r for r in sweep.runs if r.started]
  names = dict(zip(sweep.fields, sweep_tables.short_names(sweep.fields)))
  label = ('eval/accuracy' if tables.source == 'eval' else
           f'train/accuracy, mean of {sweep_tables.SMOOTH_LINES} lines')
  return plots.draw_sweep_figures(
      [r.run for r in started], [r.values for r in started],
      _sweep_finals(tables), sweep.group_fields, names, out_dir,
      accuracy=lambda run: sweep_tables.accuracy_curve(run, tables.source),
      accuracy_label=label, target=tables.target)


def write_sweep_report(folder, out=None, *,
                       target_accuracy=sweep_tables.DEFAULT_TARGET_ACCURACY,
                       target_on='auto',
                       verbose: bool = False) -> list[pathlib.Path]:
  """The sweep in `folder`: its tables, its figures and the HTML page
  (`out`, by default `folder/report.html`; the tables and `plots/` go
  next to it). Returns the paths written; without a run that logged a
  step, only the tables."""
  say = print if verbose else (lambda *a, **k: None)
  sweep = sweep_tables.load_sweep(folder)
  tables = sweep_tables.make_tables(sweep, target_accuracy, target_on)
  out = pathlib.Path(out) if out is not None else sweep.folder / 'report.html'
  paths = sweep_tables.write_tables(tables, out.parent)
  started = [r for r in sweep.runs if r.started]
  say(f'[report] sweep {sweep.folder}: {len(sweep.runs)} runs, '
      f'{len(started)} with training lines', flush=True)
  if not started:
    say('[report] no run has logged a training step yet: tables only',
        flush=True)
    return paths
  figures = _sweep_figures(sweep, tables, out.parent / 'plots')
  top = [sweep_tables.html_section(tables), '<h2>Sweep figures</h2>'] + [
      _figure(p.stem, p, SWEEP_CAPTIONS[p.stem.split('_')[0]])
      for p in figures]
  page = write_report([r.workdir for r in started], out, verbose,
                      title=tables.title, top=top)
  return paths + figures + [page]


def _is_sweep_call(workdirs) -> bool:
  """One folder that is not itself a run: read as a sweep (whose loading
  says what is wrong with a folder that holds no runs)."""
  return len(workdirs) == 1 and not (
      pathlib.Path(workdirs[0]) / 'config.json').exists()


def main(argv=None) -> int:
  parser = ArgumentParser(prog='python -m cnn_lab.report',
                                description=__doc__.split('\n\n')[0])
  parser.add_argument('workdirs', nargs='+',
                      help='run folders, or one sweep folder')
  parser.add_argument('--out', default=None,
                      help='the HTML file to write (required for run '
                      'folders; a sweep\'s default is SWEEP/report.html, '
                      'its tables and plots go next to it)')
  parser.add_argument('--target-accuracy', type=float,
                      default=sweep_tables.DEFAULT_TARGET_ACCURACY,
                      help='a sweep\'s "steps to" column: the first step '
                      'that reached this accuracy (default %(default)s)')
  parser.add_argument('--target-on', choices=sweep_tables.TARGET_SOURCES,
                      default='auto', help='the accuracy that column reads: '
                      'eval/accuracy, train/accuracy (a trailing mean), or '
                      'auto: eval when the runs evaluated along the way')
  args = parser.parse_args(argv)
  sweep = _is_sweep_call(args.workdirs)
  if not sweep and args.out is None:
    parser.error('the following arguments are required: --out')
  try:
    if sweep:
      paths = write_sweep_report(args.workdirs[0], args.out,
                                 target_accuracy=args.target_accuracy,
                                 target_on=args.target_on, verbose=True)
      for path in paths:
        print(path)
    else:
      write_report(args.workdirs, args.out, verbose=True)
  except (ConfigError, OSError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())

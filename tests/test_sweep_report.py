"""The report of a sweep folder (cnn_lab.sweep_tables, and cnn_lab.report
on a folder): hand-written runs of a norm x dropout x seed sweep whose
accuracies and gradient norms the test chooses, with a run that diverged,
one interrupted, one that wrote no metrics and one never started. The
tables' numbers are checked against values computed here from those
choices; no training."""

import csv
import json
import pathlib
import shutil
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from cnn_lab import report, sweep_tables
from fake_runs import write_fake_run

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS, LOG_EVERY, EVAL_EVERY = 20, 2, 4
NORMS, RATES, SEEDS = ('batch', 'none'), (0.0, 0.5), (0, 1, 2)
FIELDS = ['model.norm', 'model.dropout_rate', 'seed']
TARGET = 0.5
# The special runs: (norm, dropout_rate, seed) -> what happened.
DIVERGED = ('none', 0.0, 2)  # Gradients nan from step 12; halted there.
INTERRUPTED = ('batch', 0.5, 0)  # Killed after step 14.
NO_METRICS = ('none', 0.5, 1)  # A folder with config.json only.
ABSENT = ('none', 0.5, 2)  # Listed in sweep.json, no folder.


def final_accuracy(norm, rate, seed) -> float:
  return {'batch': 0.85, 'none': 0.6}[norm] - 0.1 * rate + 0.013 * seed


def eval_accuracy(key, step) -> float:
  return final_accuracy(*key) * step / NUM_STEPS


def train_accuracy(key, step) -> float:
  """The eval curve with a zigzag of +-0.1, which a trailing mean damps."""
  return eval_accuracy(key, step) + 0.1 * (-1) ** (step // LOG_EVERY)


def chosen_ratio(norm, rate, seed) -> float:
  """first-layer / last-layer gradient norm."""
  return (1e-1 if norm == 'batch' else 1e-4) * (1 + rate) * (1 + seed)


def last_step(key) -> int:
  return {DIVERGED: 12, INTERRUPTED: 14}.get(key, NUM_STEPS)


def run_name(key) -> str:
  norm, rate, seed = key
  return f'norm={norm},dropout_rate={rate},seed={seed}'


def write_run(workdir, key):
  """A fake run (tests/fake_runs.py) with this test's config values,
  accuracies and first-layer gradient norm; batch-norm runs get a norm
  layer before the first convolution, with a large gradient, which the
  ratio must not read."""
  norm, rate, seed = key
  write_fake_run(workdir, name='vgg_sweep', norm=norm, num_steps=NUM_STEPS,
                 log_every=LOG_EVERY,
                 nonfinite_step=12 if key == DIVERGED else None)
  config = json.loads((workdir / 'config.json').read_text())
  config['seed'] = seed
  config['model']['dropout_rate'] = rate
  (workdir / 'config.json').write_text(json.dumps(config))
  if norm == 'batch':
    layers = json.loads((workdir / 'layers.json').read_text())
    layers.insert(0, {'name': 'input_bn', 'kind': 'norm', 'num_params': 2})
    (workdir / 'layers.json').write_text(json.dumps(layers))
  lines = []
  for text in (workdir / 'metrics.jsonl').read_text().splitlines():
    line = json.loads(text)
    if 'train/loss' not in line or line['step'] > last_step(key):
      continue  # Eval lines are rewritten below.
    step = line['step']
    line['train/accuracy'] = train_accuracy(key, step)
    if line['grad_norm/fc2'] != 'nan':
      line['grad_norm/block1_conv1'] = chosen_ratio(*key) * line[
          'grad_norm/fc2']
    if norm == 'batch':
      line['grad_norm/input_bn'] = 1e3
    lines.append(line)
    # A halted run stops before its step's evaluation.
    if step % EVAL_EVERY == 0 and key != DIVERGED or (
        key == DIVERGED and step % EVAL_EVERY == 0 and step < 12):
      lines.append({'step': step, 'eval/loss': 1.0,
                    'eval/accuracy': eval_accuracy(key, step)})
  (workdir / 'metrics.jsonl').write_text(
      ''.join(json.dumps(l) + '\n' for l in lines))


KEYS = [(n, r, s) for n in NORMS for r in RATES for s in SEEDS]


def write_sweep(folder) -> pathlib.Path:
  folder.mkdir(parents=True)
  for key in KEYS:
    workdir = folder / run_name(key)
    if key == NO_METRICS:
      workdir.mkdir()
      (workdir / 'config.json').write_text('{"name": "vgg_sweep"}')
    elif key != ABSENT:
      write_run(workdir, key)
  runs = [{'name': run_name(k), 'overrides': dict(zip(FIELDS, k))}
          for k in KEYS]
  (folder / 'sweep.json').write_text(json.dumps(
      {'config': 'configs/sweeps/fake.py', 'fields': FIELDS, 'runs': runs}))
  return folder


def run_report(*args):
  return subprocess.run([sys.executable, '-m', 'cnn_lab.report', *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  """The sweep folder after `python -m cnn_lab.report SWEEP
  --target-accuracy 0.5`, and that command's output."""
  folder = write_sweep(tmp_path_factory.mktemp('sweeps') / 'fake')
  proc = run_report(str(folder), '--target-accuracy', str(TARGET))
  assert proc.returncode == 0, proc.stderr
  return folder, proc


def read_csv(path) -> list[dict]:
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def number(text):
  return None if text == '' else float(text)


# --- What the test expects, from its own choices. ---


def expected_eval_steps(key) -> list[int]:
  return [s for s in range(EVAL_EVERY, last_step(key) + 1, EVAL_EVERY)
          if key != DIVERGED or s < 12]


def expected_row(key) -> dict:
  """final train/test accuracy, steps to TARGET on eval/accuracy, ratio."""
  evals = expected_eval_steps(key)
  last = last_step(key)
  # The diverged run's gradients are nan from step 12: the last finite
  # line is step 10.
  ratio_step = 10 if key == DIVERGED else last
  reached = [s for s in evals if eval_accuracy(key, s) >= TARGET]
  return {'steps': last, 'final_train_accuracy': train_accuracy(key, last),
          'final_test_accuracy': eval_accuracy(key, evals[-1]),
          'steps_to_target': reached[0] if reached else None,
          'grad_ratio': chosen_ratio(*key), 'grad_ratio_step': ratio_step}


def expected_status(key) -> str:
  return {DIVERGED: 'diverged', INTERRUPTED: 'running-or-interrupted',
          NO_METRICS: 'failed: no metrics',
          ABSENT: 'not started'}.get(key, 'finished')


# --- The tables. ---


def test_command_prints_every_path_it_wrote(sweep):
  folder, proc = sweep
  printed = {pathlib.Path(l) for l in proc.stdout.splitlines()
             if not l.startswith('[')}
  expected = {folder / n for n in ('sweep.csv', 'sweep_groups.csv',
                                   'sweep.md', 'report.html')} | {
      folder / 'plots' / f'{kind}_by_{field}.png'
      for kind in ('curves', 'final') for field in ('norm', 'dropout_rate')}
  assert printed == expected
  assert all(p.is_file() and p.stat().st_size > 0 for p in printed)
  assert proc.stderr == ''


def test_run_rows_match_the_chosen_numbers(sweep):
  rows = read_csv(sweep[0] / 'sweep.csv')
  assert [r['run'] for r in rows] == [run_name(k) for k in KEYS]
  for key, row in zip(KEYS, rows):
    assert (row['model.norm'], float(row['model.dropout_rate']),
            int(row['seed'])) == key
    assert row['status'] == expected_status(key), key
    assert row['target_accuracy'] == '0.5' and row['target_on'] == 'eval'
    if key in (NO_METRICS, ABSENT):
      assert all(row[c] == '' for c in (
          'steps', 'final_train_accuracy', 'final_test_accuracy',
          'steps_to_target', 'grad_ratio')), row
      continue
    want = expected_row(key)
    for column, value in want.items():
      if value is None:
        assert row[column] == '', (key, column)
      else:
        assert number(row[column]) == pytest.approx(value, rel=1e-9), (
            key, column)
    assert (row['first_layer'], row['last_layer']) == ('block1_conv1', 'fc2')


def test_steps_to_target_examples(sweep):
  rows = {r['run']: r for r in read_csv(sweep[0] / 'sweep.csv')}
  # 0.85 * s / 20 >= 0.5 first at s = 11.8: the evaluation at step 12.
  assert rows[run_name(('batch', 0.0, 0))]['steps_to_target'] == '12'
  # 0.6 * s / 20 >= 0.5 first at 16.7: step 20.
  assert rows[run_name(('none', 0.0, 0))]['steps_to_target'] == '20'
  # The diverged run evaluated at 4 and 8 only, below 0.5.
  assert rows[run_name(DIVERGED)]['steps_to_target'] == ''


def expected_groups():
  """(norm, rate) -> n, finished, and (mean, std ddof=1, count) of each
  number over the group's runs that have it, computed with numpy."""
  out = {}
  for norm in NORMS:
    for rate in RATES:
      keys = [(norm, rate, s) for s in SEEDS]
      rows = [expected_row(k) for k in keys if k not in (NO_METRICS, ABSENT)]
      group = {'n': 3, 'finished': sum(expected_status(k) == 'finished'
                                       for k in keys)}
      for column in ('final_train_accuracy', 'final_test_accuracy',
                     'steps_to_target', 'grad_ratio'):
        values = np.array([r[column] for r in rows if r[column] is not None],
                          float)
        group[column] = (values.mean() if values.size else None,
                         values.std(ddof=1) if values.size > 1 else None,
                         values.size)
      out[norm, rate] = group
  return out


def test_groups_are_mean_and_std_over_seeds(sweep):
  rows = read_csv(sweep[0] / 'sweep_groups.csv')
  want = expected_groups()
  assert [(r['model.norm'], float(r['model.dropout_rate'])) for r in rows] \
      == list(want)
  assert 'seed' not in rows[0]
  for row in rows:
    group = want[row['model.norm'], float(row['model.dropout_rate'])]
    assert int(row['n']) == group['n']
    assert int(row['finished']) == group['finished']
    for column in ('final_train_accuracy', 'final_test_accuracy',
                   'steps_to_target', 'grad_ratio'):
      mean, std, count = group[column]
      assert int(row[f'{column}_n']) == count
      for stat, value in (('mean', mean), ('std', std)):
        got = number(row[f'{column}_{stat}'])
        assert (got is None) == (value is None), (row, column, stat)
        if value is not None:
          assert got == pytest.approx(value, rel=1e-9), (column, stat)
  # The (none, 0.5) group has one run with numbers of three: no std.
  last = rows[-1]
  assert last['final_test_accuracy_n'] == '1'
  assert last['final_test_accuracy_std'] == ''


def markdown_tables(text) -> dict[str, list[list[str]]]:
  """'Runs' and 'Over seeds': the cells of each table's body."""
  tables, current = {}, None
  for line in text.splitlines():
    if line.startswith('## '):
      current = tables.setdefault(line[3:], [])
    elif line.startswith('| ') and current is not None:
      current.append([c.strip() for c in line.strip('|').split(' | ')])
  return {k: v[1:] for k, v in tables.items()}  # Without the head row.


def test_markdown_tables(sweep):
  text = (sweep[0] / 'sweep.md').read_text()
  assert 'eval/accuracy ≥ 0.5' in text  # The note says what it reads.
  assert 'ddof=1' in text
  tables = markdown_tables(text)
  runs, groups = tables['Runs'], tables['Over seeds']
  assert len(runs) == 12 and len(groups) == 4
  by_key = dict(zip(KEYS, runs))
  row = by_key[('batch', 0.0, 1)]
  want = expected_row(('batch', 0.0, 1))
  assert row == ['batch', '0.0', '1', 'finished', '20',
                 f'{want["final_train_accuracy"]:.4f}',
                 f'{want["final_test_accuracy"]:.4f}', '12',
                 f'{want["grad_ratio"]:.3g}']
  assert by_key[ABSENT] == ['none', '0.5', '2', 'not started'] + ['–'] * 5
  assert by_key[NO_METRICS][3:] == ['failed: no metrics'] + ['–'] * 5
  assert by_key[DIVERGED][3:6] == [
      'diverged', '12', f'{train_accuracy(DIVERGED, 12):.4f}']
  assert by_key[DIVERGED][7] == 'not reached'
  mean, std, _ = expected_groups()['batch', 0.0]['final_test_accuracy']
  assert groups[0][:4] == ['batch', '0.0', '3', '3']
  assert groups[0][5] == f'{mean:.4f} ± {std:.4f}'
  # One of three runs has numbers: its value, no std, and how many.
  only = expected_row(('none', 0.5, 0))['final_test_accuracy']
  assert groups[3][5] == f'{only:.4f} (1 of 3)'


def trailing_means(values, window):
  """Each value's mean with up to window - 1 before it, via cumsum."""
  sums = np.cumsum(np.concatenate([[0.0], values]))
  i = np.arange(1, len(values) + 1)
  start = np.maximum(i - window, 0)
  return (sums[i] - sums[start]) / (i - start)


def test_steps_to_target_on_smoothed_train_accuracy(sweep):
  """On train/accuracy the zigzag would cross 0.5 early; the trailing
  mean of 5 logged lines crosses it where this computes."""
  tables = sweep_tables.make_tables(sweep_tables.load_sweep(sweep[0]),
                                    TARGET, 'train')
  assert tables.source == 'train'
  rows = {r['run']: r for r in tables.run_rows}
  for key in KEYS:
    if key in (NO_METRICS, ABSENT):
      continue
    steps = np.arange(LOG_EVERY, last_step(key) + 1, LOG_EVERY)
    means = trailing_means([train_accuracy(key, s) for s in steps],
                           sweep_tables.SMOOTH_LINES)
    reached = steps[means >= TARGET]
    want = int(reached[0]) if reached.size else None
    assert rows[run_name(key)]['steps_to_target'] == want, key
    raw = steps[[train_accuracy(key, s) >= TARGET for s in steps]]
    if want is not None and raw.size:
      assert raw[0] <= want  # The raw curve gets there first, or as soon.
  assert any(rows[run_name(k)]['steps_to_target'] is not None for k in KEYS)


# --- The page and the figures. ---


def test_report_has_the_tables_first_and_every_run(sweep):
  page = (sweep[0] / 'report.html').read_text()
  assert page.index('Sweep: one row per run') < page.index(
      'Sweep: over seeds') < page.index('Sweep figures') < page.index(
          'Config fields that differ')
  assert 'cnn_lab report: Sweep fake' in page
  assert '10 run(s)' in page  # Those with training lines.
  assert page.count('<img src="data:image/png;base64,') >= 4 + 4


def test_sweep_figures_are_drawn(sweep):
  for path in (sweep[0] / 'plots').glob('*.png'):
    rgb = matplotlib.image.imread(path)[..., :3].astype(float)
    assert rgb.shape[0] > 300 and rgb.shape[1] > 600, path
    assert rgb.std() > 0.05, path  # Not blank.
    colour = ((rgb.max(-1) - rgb.min(-1)) > 0.3).sum()
    assert colour > 2000, (path, colour)  # Lines, bands and markers.


def test_folder_of_runs_without_sweep_json(sweep, tmp_path):
  """Any folder of run folders: the swept fields are the config fields
  that differ."""
  folder = tmp_path / 'loose'
  keys = [('batch', 0.0, 0), ('batch', 0.0, 1), ('none', 0.0, 0)]
  for key in keys:
    shutil.copytree(sweep[0] / run_name(key),
                    folder / f'{key[0]}-seed{key[2]}')
  loaded = sweep_tables.load_sweep(folder)
  assert loaded.fields == ['model.norm', 'seed']
  assert loaded.group_fields == ['model.norm']
  tables = sweep_tables.make_tables(loaded, TARGET)
  paths = sweep_tables.write_tables(tables, folder)
  assert [p.name for p in paths] == ['sweep.csv', 'sweep_groups.csv',
                                     'sweep.md']
  assert [r['run'] for r in read_csv(folder / 'sweep.csv')] == [
      'batch-seed0', 'batch-seed1', 'none-seed0']
  groups = read_csv(folder / 'sweep_groups.csv')
  assert [(g['model.norm'], g['n']) for g in groups] == [('batch', '2'),
                                                          ('none', '1')]
  want = np.mean([expected_row(k)['grad_ratio'] for k in keys[:2]])
  assert float(groups[0]['grad_ratio_mean']) == pytest.approx(want)


def test_status_without_a_step_count(sweep, tmp_path):
  """A run set by epochs has no num_steps: done.json (written by
  cnn_lab.sweeps), or its plots with an evaluation at its last step, say
  it finished; the interrupted run has neither."""
  folder = tmp_path / 'epochs'
  for key in (('batch', 0.0, 0), ('batch', 0.0, 1), INTERRUPTED):
    workdir = shutil.copytree(sweep[0] / run_name(key),
                              folder / run_name(key))
    config = json.loads((workdir / 'config.json').read_text())
    del config['train']['num_steps']
    (workdir / 'config.json').write_text(json.dumps(config))
  (folder / run_name(('batch', 0.0, 0)) / 'done.json').write_text('{}')
  plots = folder / run_name(('batch', 0.0, 1)) / 'plots'
  plots.mkdir()
  (plots / 'curves.png').write_bytes(b'')
  entries = sweep_tables.load_sweep(folder).runs
  assert [sweep_tables.run_status(e) for e in entries] == [
      'finished', 'finished', 'running-or-interrupted']


def test_a_plain_run_folder_still_needs_out(sweep, capsys):
  workdir = sweep[0] / run_name(('batch', 0.0, 0))
  with pytest.raises(SystemExit) as exit_info:
    report.main([str(workdir)])
  assert exit_info.value.code == 2
  assert 'required: --out' in capsys.readouterr().err


# --- Bad input: one error line, exit status 2, nothing written. ---


@pytest.mark.parametrize('case', ['empty_folder', 'no_such_folder',
                                  'broken_sweep_json', 'runs_not_a_list',
                                  'bad_target'])
def test_bad_input_is_one_error_line(case, tmp_path, capsys):
  folder = tmp_path / 'sweep'
  if case != 'no_such_folder':
    folder.mkdir()
  args = [str(folder)]
  if case == 'broken_sweep_json':
    (folder / 'sweep.json').write_text('{"runs": [')
  elif case == 'runs_not_a_list':
    (folder / 'sweep.json').write_text('{"fields": [], "runs": {}}')
  elif case == 'bad_target':
    write_run(folder / 'a', ('batch', 0.0, 0))
    write_run(folder / 'b', ('none', 0.0, 0))
    args += ['--target-accuracy', '80']
  assert report.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  expected = {'empty_folder': 'no sweep.json and no run folders',
              'no_such_folder': 'no such folder',
              'broken_sweep_json': 'sweep.json cannot be read',
              'runs_not_a_list': 'sweep.json cannot be read',
              'bad_target': 'must be in (0, 1]'}[case]
  assert expected in err[0]
  assert not (folder / 'sweep.csv').exists()
  assert not (folder / 'report.html').exists()


def test_a_sweep_without_any_started_run_writes_its_tables(tmp_path):
  folder = tmp_path / 'pending'
  folder.mkdir()
  (folder / 'sweep.json').write_text(json.dumps({'fields': ['seed'], 'runs': [
      {'name': 'seed=0', 'overrides': {'seed': 0}},
      {'name': 'seed=1', 'overrides': {'seed': 1}}]}))
  paths = report.write_sweep_report(folder)
  assert [p.name for p in paths] == ['sweep.csv', 'sweep_groups.csv',
                                     'sweep.md']
  rows = read_csv(folder / 'sweep.csv')
  assert [r['status'] for r in rows] == ['not started'] * 2
  groups = read_csv(folder / 'sweep_groups.csv')
  assert len(groups) == 1
  assert (groups[0]['n'], groups[0]['finished']) == ('2', '0')

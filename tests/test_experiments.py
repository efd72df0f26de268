"""The seven experiments (cnn_lab/experiments, experiments/NAME/): each one
run end to end at the tiny budget, so that no sweep file, flag or analysis
rots; and the runner's own pieces."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from cnn_lab import check, experiments, sweep_tables
from cnn_lab.experiments import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Runs that are meant to diverge (the tiny budget may or may not get there).
MAY_DIVERGE = {'exploding_gradients'}


@pytest.mark.parametrize('name', experiments.NAMES)
def test_each_experiment_runs_at_the_tiny_budget(name, tmp_path):
  workdir, out = tmp_path / 'runs', tmp_path / 'out'
  results = experiments.run(name, 'tiny', workdir, out)
  exp = experiments.module(name)
  text = results.read_text()
  assert text.startswith(f'# {exp.TITLE}: results')
  assert '--budget=tiny' in text and '|---|' in text
  # Every run of every stage finished (or diverged where that is the point)
  # and is a row of the results.
  for stage in exp.STAGES:
    sweep = sweep_tables.load_sweep(workdir / stage.name)
    assert sweep.runs
    for run in sweep.runs:
      status = sweep_tables.run_status(run)
      allowed = ({sweep_tables.FINISHED, sweep_tables.DIVERGED}
                 if name in MAY_DIVERGE else {sweep_tables.FINISHED})
      assert status in allowed, (run.name, status)
      assert run.run.config['train']['num_steps'] == 3
  # Every figure the results link exists, as a PNG.
  linked = [line.split('](')[1].rstrip(')') for line in text.splitlines()
            if line.startswith('![')]
  assert linked
  for rel in linked:
    assert (out / rel).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', rel
  # `analyse` alone redoes the tables and keeps the training run's time.
  timing = json.loads((workdir / experiments.TIMING).read_text())
  minutes, secs = divmod(int(timing['seconds']), 60)
  header = text.splitlines()[2]
  assert f'{minutes} min {secs:02d} s in all' in header
  (workdir / experiments.TIMING).write_text(json.dumps(
      {'date': '2001-02-03', 'seconds': 3725}))
  again = experiments.run(name, 'tiny', workdir, out, train=False)
  header = again.read_text().splitlines()[2]
  assert 'Measured 2001-02-03' in header and '62 min 05 s in all' in header


def test_every_experiment_has_its_folder_readme_and_sweep_files():
  for name in experiments.NAMES:
    exp = experiments.module(name)
    folder = ROOT / 'experiments' / name
    readme = (folder / 'README.md').read_text()
    assert experiments.RESULTS_BEGIN in readme
    assert experiments.RESULTS_END in readme
    assert f'python -m cnn_lab.experiments run {name}' in readme
    for stage in exp.STAGES:
      assert (folder / stage.sweep).is_file()
    # The measured run's figures are committed next to the README.
    for rel in [l.split('](')[1].split(')')[0] for l in readme.splitlines()
                if l.startswith('![')]:
      assert (folder / rel).is_file(), (name, rel)


def test_write_results_replaces_only_the_marked_block(tmp_path):
  readme = tmp_path / 'README.md'
  readme.write_text('intro\n' + experiments.RESULTS_BEGIN + '\nold table\n'
                    + experiments.RESULTS_END + '\nwhat it shows\n')
  experiments.write_results(tmp_path, 'batch_norm', 'Batch norm', 'cpu',
                            125.0, '| a |\n|---|\n| 1 |')
  text = readme.read_text()
  assert text.startswith('intro\n') and text.endswith('\nwhat it shows\n')
  assert 'old table' not in text and '| 1 |' in text
  assert '2 min 05 s in all' in text
  assert (tmp_path / 'results.md').read_text().startswith(
      '# Batch norm: results')


def test_rises_agree_with_the_check_command():
  values = [2.0, 1.5, 1.502, 1.4, 1.41, math.nan, 1.0]
  steps = list(range(len(values)))
  assert common.rises(values) == len(check.find_rises(steps, values)) == 3


def test_steps_to_and_late_mean_on_a_fake_run(tmp_path):
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text(json.dumps({'name': 'x', 'train': {}}))
  (run / 'layers.json').write_text(json.dumps(
      [{'name': 'conv', 'kind': 'conv', 'num_params': 10},
       {'name': 'fc', 'kind': 'dense', 'num_params': 5}]))
  lines = [{'step': s, 'train/loss': l, 'grad_norm/global': 1.0}
           for s, l in ((10, 3.0), (20, 2.0), (30, 1.0), (40, 0.5),
                        (50, 0.25))]
  lines += [{'step': 20, 'eval/accuracy': 0.5},
            {'step': 40, 'eval/accuracy': 0.81}]
  (run / 'metrics.jsonl').write_text(
      ''.join(json.dumps(l) + '\n' for l in lines))
  sweep = sweep_tables.SweepRun('x', run, {'model.norm': 'batch'},
                                sweep_tables._read_run(run))
  entry = common.Entry(sweep)
  assert entry['norm'] == 'batch'
  assert common.steps_to(entry, 0.8) == 40
  assert common.steps_to(entry, 0.9) is None
  assert common.late_mean(entry, 'train/loss', 0.4) == pytest.approx(0.375)
  assert common.num_params(entry) == 15


def test_cli_lists_and_refuses_an_unknown_experiment():
  cmd = [sys.executable, '-m', 'cnn_lab.experiments']
  listed = subprocess.run(cmd + ['list'], cwd=ROOT, capture_output=True,
                          text=True)
  assert listed.returncode == 0
  assert [l.split()[0] for l in listed.stdout.splitlines()] == list(
      experiments.NAMES)
  bad = subprocess.run(cmd + ['run', 'nope'], cwd=ROOT, capture_output=True,
                       text=True)
  assert bad.returncode == 2
  assert bad.stderr.strip().count('\n') == 0
  assert "'nope' is not an experiment" in bad.stderr
  bad = subprocess.run(cmd + ['analyse', 'batch_norm', '--workdir',
                              '/nonexistent/x'], cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode == 2 and 'run the experiment first' in bad.stderr


def test_dropout_rise_counts_and_largest_rise():
  from cnn_lab.experiments import dropout_cost
  values = [2.0, 1.0, 1.3, 1.2, 1.8, 1.8005]
  # Rises above 0.1%: 1.0 -> 1.3 and 1.2 -> 1.8 (1.8 -> 1.8005 is 0.03%).
  assert dropout_cost._rises(values) == '2 of 5'
  assert dropout_cost._largest_rise(values) == pytest.approx(0.6 / 1.2)
  assert dropout_cost._largest_rise([3.0, 2.0, 1.0]) == pytest.approx(-1 / 3)

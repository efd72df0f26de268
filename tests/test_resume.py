"""Checkpoints and exact resume (SIGKILL at a random step), damaged
checkpoints, a workdir of another config, divergence (halt and skip),
determinism."""

import hashlib
import json
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cnn_lab import train, writers
from cnn_lab.errors import ConfigError
from configs import lenet5, plain20_diverge, plain20_diverge_clip

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A short LeNet-5 run: checkpoints every 4 steps, a metrics line every step.
SHORT = {'model.width': 0.5, 'train.num_steps': 24, 'train.batch_size': 16,
         'checkpoint_every_steps': 4, 'log_every_steps': 1,
         'eval_every_steps': 10, 'eval_num_examples': 50,
         'probe_batch_size': 32}
LR = lenet5.get_config().optim.learning_rate  # The config file's.


def configure(module, overrides=SHORT, **more):
  config = module.get_config()
  for key, value in {**overrides, **more}.items():
    node = config
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  return config


def launch_args(config_name, workdir, overrides=SHORT, **more):
  return [sys.executable, str(ROOT / 'launch.py'),
          f'--config={ROOT}/configs/{config_name}.py', f'--workdir={workdir}',
          *[f'--config.{k}={v}' for k, v in {**overrides, **more}.items()]]


def final_params(workdir: pathlib.Path) -> dict:
  """The arrays of the newest checkpoint, read back by orbax alone."""
  import orbax.checkpoint as ocp
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                 if p.name.isdigit())
  restored = ocp.StandardCheckpointer().restore(
      workdir / 'checkpoints' / str(steps[-1]) / 'default')
  flat = {}

  def visit(tree, path):
    if isinstance(tree, dict):
      for k, v in tree.items():
        visit(v, f'{path}/{k}')
    else:
      flat[path] = np.asarray(tree)

  visit(restored, '')
  return flat


def tree_digest(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The short run, uninterrupted, through launch.py."""
  workdir = tmp_path_factory.mktemp('ref') / 'run'
  proc = subprocess.run(launch_args('lenet5', workdir), capture_output=True,
                        text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  return workdir


def test_sigkill_at_a_random_step_then_resume_is_exact(reference, tmp_path):
  workdir = tmp_path / 'run'
  args = launch_args('lenet5', workdir)
  seed = random.randrange(10**6)
  kill_after = random.Random(seed).randint(6, 20)  # metric lines
  proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, cwd=ROOT)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and metrics.read_text().count('\n') >= kill_after:
      break
    time.sleep(0.02)
  assert proc.poll() is None, f'the run ended before the kill (seed {seed})'
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = metrics.read_text().count('\n')

  resumed = subprocess.run(args, capture_output=True, text=True, timeout=600,
                           cwd=ROOT)
  assert resumed.returncode == 0, resumed.stderr
  assert 'resumed from the checkpoint of step' in resumed.stdout, (
      f'killed after {killed_at} lines (seed {seed}): {resumed.stdout}')
  assert metrics.read_bytes() == (reference / 'metrics.jsonl').read_bytes()
  ours, theirs = final_params(workdir), final_params(reference)
  assert ours.keys() == theirs.keys() and len(ours) > 10
  for key in ours:  # Bit-identical on the CPU.
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_damaged_checkpoints_are_skipped(reference, tmp_path, capsys):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(configure(lenet5), workdir)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == [
      '16', '20', '24']
  # The newest has its files truncated; the one before lost its files.
  for path in (workdir / 'checkpoints' / '24').rglob('*'):
    if path.is_file():
      path.write_bytes(b'')
  for path in (workdir / 'checkpoints' / '20' / 'default').rglob('*'):
    if path.is_file():
      path.unlink()
  capsys.readouterr()
  train.train_and_evaluate(configure(lenet5), workdir)
  out = capsys.readouterr().out
  for step in (24, 20):
    assert f'checkpoint {workdir / "checkpoints" / str(step)} is damaged' in out
    assert (workdir / 'checkpoints_damaged' / str(step)).is_dir()
  assert 'resumed from the checkpoint of step 16' in out
  assert (workdir / 'metrics.jsonl').read_bytes() == (
      reference / 'metrics.jsonl').read_bytes()
  ours, theirs = final_params(workdir), final_params(reference)
  for key in theirs:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_same_config_and_seed_give_identical_metrics(reference, tmp_path):
  # In process, against the launch.py run: the same bytes.
  train.train_and_evaluate(configure(lenet5), tmp_path / 'run')
  assert (tmp_path / 'run' / 'metrics.jsonl').read_bytes() == (
      reference / 'metrics.jsonl').read_bytes()
  # A finished run launched again is left as it is.
  before = tree_digest(tmp_path / 'run')
  train.train_and_evaluate(configure(lenet5), tmp_path / 'run')
  after = tree_digest(tmp_path / 'run')
  assert {k: v for k, v in after.items() if not k.startswith('plots')} == {
      k: v for k, v in before.items() if not k.startswith('plots')}


def test_steps_without_statistics_between_logged_steps_train_alike(
    reference, tmp_path, capsys, monkeypatch):
  # Logging every 5th step, the 19 steps in between run the step without
  # per-layer statistics. The logged lines (5, 10, 15, 20, 24) must hold
  # every key of the reference run (which logs all steps with statistics)
  # with the same values, and the final weights must be the reference's.
  monkeypatch.setattr(train, 'MIN_UNLOGGED_STEPS', 19)
  train.train_and_evaluate(configure(lenet5, log_every_steps=5),
                           tmp_path / 'run')
  assert 'with and without statistics' in capsys.readouterr().out
  def by_step(workdir):  # Train and eval lines of a step together.
    merged = {}
    for line in writers.read_metrics(workdir):
      merged.setdefault(line['step'], {}).update(line)
    return merged

  ref, lines = by_step(reference), by_step(tmp_path / 'run')
  assert list(lines) == [5, 10, 15, 20, 24]
  for line in lines.values():
    expected = ref[line['step']]
    # Per-layer statistics (grad_norm/conv1, act_mean/..., bn_...) included.
    assert len([k for k in line if k.startswith('grad_norm/')]) > 1
    assert set(line) <= set(expected), set(line) - set(expected)
    for key, value in line.items():
      np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-7,
                                 err_msg=f'{key} at step {line["step"]}')
  ours, theirs = final_params(tmp_path / 'run'), final_params(reference)
  assert ours.keys() == theirs.keys()
  for key in ours:
    np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-7,
                               err_msg=key)


def test_workdir_of_another_config_is_refused_unless_overwrite(reference,
                                                               tmp_path):
  workdir = tmp_path / 'run'
  short = {**SHORT, 'train.num_steps': 4}
  train.train_and_evaluate(configure(lenet5, short), workdir)
  before = tree_digest(workdir)
  other = configure(lenet5, short, **{'optim.learning_rate': 0.123,
                                      'model.width': 0.25})
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(other, workdir)
  message = str(e.value)
  assert 'holds a run of another config' in message
  assert 'model.width: 0.5 there, 0.25 here' in message
  assert f'optim.learning_rate: {LR} there, 0.123 here' in message
  assert '--overwrite' in message
  assert tree_digest(workdir) == before  # Left as it was.

  proc = subprocess.run(
      launch_args('lenet5', workdir, short, **{'optim.learning_rate': 0.123}),
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert f'optim.learning_rate: {LR} there, 0.123 here' in lines[0]
  assert tree_digest(workdir) == before

  train.train_and_evaluate(other, workdir, overwrite=True)
  config = json.loads((workdir / 'config.json').read_text())
  assert config['optim']['learning_rate'] == 0.123
  lines = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert [l['step'] for l in lines if 'train/loss' in l] == [1, 2, 3, 4]


# Plain-20 at SGD 1.0 overflows after some 10-20 steps, the step moving
# with the convolution paths' rounding: 30 steps leave a margin.
DIVERGE = {'model.width': 0.5, 'train.num_steps': 30,
           'train.batch_size': 32, 'checkpoint_every_steps': 5,
           'log_every_steps': 2, 'eval_every_steps': 0,
           'eval_num_examples': 100, 'probe_batch_size': 64}


def test_diverging_run_halts_with_exit_3_and_its_clipped_twin_survives(
    tmp_path):
  workdir = tmp_path / 'diverge'
  proc = subprocess.run(launch_args('plain20_diverge', workdir, DIVERGE),
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 3, proc.stderr
  assert len(lines) == 1 and lines[0].startswith('error: the run diverged')
  assert 'Traceback' not in proc.stderr
  metrics = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  flagged = [l for l in metrics if 'nonfinite/first_step' in l]
  assert len(flagged) == 1
  bad_step = flagged[0]['nonfinite/first_step']
  assert f'non-finite values at step {bad_step} ' in lines[0]
  # The line names where the NaN or inf started, or says that finite
  # gradients overflowed the global norm (then there is no such place).
  where = [flagged[0][k] for k in ('nonfinite/first_activation',
                                   'nonfinite/first_grad_layer')
           if k in flagged[0]]
  assert all(w in lines[0] for w in where)
  assert where or 'the global gradient norm overflowed' in lines[0]
  # Only checkpoints from before the divergence exist, and they are finite.
  kept = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir())
  assert kept and kept[-1] < bad_step
  assert f'the last good checkpoint is step {kept[-1]}' in lines[0]
  assert all(np.isfinite(v).all() for v in final_params(workdir).values())

  twin = tmp_path / 'clip'
  train.train_and_evaluate(configure(plain20_diverge_clip, DIVERGE), twin)
  losses = [l['train/loss'] for l in map(json.loads, open(
      twin / 'metrics.jsonl')) if 'train/loss' in l]
  assert len(losses) == DIVERGE['train.num_steps'] // 2
  assert all(np.isfinite(losses))


def test_skip_drops_nonfinite_updates_and_counts_them(tmp_path):
  config = configure(plain20_diverge, DIVERGE, on_nonfinite='skip')
  train.train_and_evaluate(config, tmp_path / 'run')
  lines = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  train_lines = [l for l in lines if 'train/loss' in l]
  last = DIVERGE['train.num_steps']
  assert [l['step'] for l in train_lines][-1] == last  # It ran to the end.
  skipped = [l['train/skipped_steps'] for l in train_lines]
  assert skipped == sorted(skipped) and skipped[-1] >= 1
  # Non-finite values happened (recorded once, as under halt) ...
  flagged = [l for l in train_lines if 'nonfinite/first_step' in l]
  assert len(flagged) == 1
  assert skipped[-1] <= last - flagged[0]['nonfinite/first_step'] + 1
  # ... yet the weights stayed finite: those updates were dropped.
  assert all(np.isfinite(v).all()
             for v in final_params(tmp_path / 'run').values())
  # It evaluated at the end. The eval loss itself may be NaN: skipping keeps
  # the weights finite, not small, and in eval mode batch norm's moving
  # averages lag far behind exploded activations, which can overflow.
  assert lines[-1]['step'] == last and 'eval/loss' in lines[-1]


def test_each_step_function_compiles_once_also_after_resume(
    tmp_path, caplog, capsys, monkeypatch):
  """No recompilation inside the loop: per process, the train step (with
  statistics on logged steps, without on the others), probe, histogram and
  eval steps compile once each, also in a resumed run whose state came from
  a checkpoint."""
  # Logged steps 3, 6, 8: 5 unlogged steps, so the step without statistics
  # compiles too, also in the resumed run (2 of them left to run: the
  # choice is the whole run's, so a resume takes the same versions).
  monkeypatch.setattr(train, 'MIN_UNLOGGED_STEPS', 5)
  config = configure(lenet5, {**SHORT, 'train.num_steps': 8,
                              'log_every_steps': 3, 'eval_every_steps': 3,
                              'histogram_every_steps': 2})
  counts = []
  for attempt in range(2):
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
      train.train_and_evaluate(config, tmp_path / 'run')
    compiled = [r.getMessage() for r in caplog.records]
    counts.append({name: sum(m.startswith(f'Compiling jit({name})')
                             for m in compiled)
                   for name in ('train_step', 'train_step_with_stats',
                                'probe_step', 'histogram_step', 'eval_step')})
    if attempt == 0:  # Resume from step 4 next time.
      shutil.rmtree(tmp_path / 'run' / 'checkpoints' / '8')
  assert 'resumed from the checkpoint of step 4' in capsys.readouterr().out
  assert counts[0] == {'train_step': 1, 'train_step_with_stats': 1,
                       'probe_step': 1, 'histogram_step': 1,
                       'eval_step': 1}, counts
  assert counts[1] == counts[0], counts

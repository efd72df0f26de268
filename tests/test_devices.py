"""Data parallelism over the devices of one machine (cnn_lab/distributed.py):
launch.py on 4 CPU devices, in subprocesses (XLA fixes the device count
when it starts), against the same run on this process's one device."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# LeNet-5 with batch norm: on 4 devices each holds 2 of the 8 examples, so
# statistics per device instead of over the global batch would change the
# first step's loss by ~1e-2 (2.836 against 2.862), 1,000 times the
# tolerance below. (Average pooling: these tests do not depend on max
# pooling's gradient, which XLA's recomputation of its input turned NaN in
# this model on real data, on one device too, before kernels/pooling.py
# compared cells with cells.)
TINY = ['--config=configs/lenet5.py', '--config.model.norm=batch',
        '--config.model.pool=avg', '--config.train.batch_size=8',
        '--config.train.num_steps=3', '--config.log_every_steps=1',
        '--config.eval_every_steps=0', '--config.eval_num_examples=16',
        '--config.eval_batch_size=8', '--config.probe_batch_size=16']


def launch(workdir, *args, devices: int = 1, env=None):
  """launch.py in a subprocess that sees `devices` CPU devices."""
  flags = os.environ.get('XLA_FLAGS', '')
  if devices > 1:
    flags = f'{flags} --xla_force_host_platform_device_count={devices}'
  return subprocess.Popen(
      [sys.executable, str(ROOT / 'launch.py'), f'--workdir={workdir}',
       *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=os.environ | {'XLA_FLAGS': flags.strip(),
                                   'JAX_PLATFORMS': 'cpu',
                                   'PYTHONUNBUFFERED': '1'} | (env or {}))


def train_here(workdir, args) -> None:
  """The run of launch.py's `args` (configs/lenet5.py and --config.*
  overrides) in this process, on its one device: an interpreter less to
  start."""
  from cnn_lab.train import train_and_evaluate
  from configs import lenet5
  assert args[0] == '--config=configs/lenet5.py'
  config = lenet5.get_config()
  for arg in args[1:]:
    field, text = arg[len('--config.'):].split('=', 1)
    *parents, name = field.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    try:
      node[name] = ast.literal_eval(text)
    except ValueError:  # A word: a string.
      node[name] = text
  train_and_evaluate(config, workdir)


def finish(proc, timeout=300):
  """(exit status, stdout, stderr) of a launch; killed after `timeout`."""
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
  return proc.returncode, out, err


def read_lines(workdir) -> list[dict]:
  return [json.loads(l) for l in (workdir / 'metrics.jsonl').open()]


def assert_same_metrics(lines, expected, rtol=1e-4, atol=1e-6):
  """The same lines, keys and strings; numbers equal within float
  tolerance (the order of the devices' sums differs)."""
  assert [sorted(l) for l in lines] == [sorted(l) for l in expected]
  for line, want in zip(lines, expected):
    for key, value in want.items():
      if isinstance(value, float):
        np.testing.assert_allclose(line[key], value, rtol=rtol, atol=atol,
                                   err_msg=f'step {want["step"]} {key}')
      else:
        assert line[key] == value, (want['step'], key)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The tiny run on 4 devices and batch 6 on 4 devices, in subprocesses,
  and meanwhile the tiny run on this process's one device: {name:
  (workdir, exit status, stdout, stderr)}."""
  base = tmp_path_factory.mktemp('devices')
  procs = {
      'four': launch(base / 'four', *TINY, devices=4),
      'batch6': launch(base / 'batch6', *TINY, '--config.train.batch_size=6',
                       devices=4)}
  try:
    train_here(base / 'one', TINY)  # Meanwhile.
  finally:
    done = {name: (base / name, *finish(proc))
            for name, proc in procs.items()}
  return {'one': (base / 'one', 0, '', ''), **done}


def test_four_devices_match_one(runs):
  for name in ('one', 'four'):
    _, status, _, err = runs[name]
    assert status == 0, err
  lines = read_lines(runs['four'][0])
  assert [l['step'] for l in lines] == [1, 2, 3, 3]  # The last: eval.
  # Batch norm, and the per-layer statistics.
  assert {'probe/bn_train_eval_gap', 'grad_norm/bn2'} <= set(lines[0])
  assert_same_metrics(lines, read_lines(runs['one'][0]))


def read_state(workdir, step: int) -> dict:
  """The train state of a run's checkpoint, onto this process's device
  (whatever devices and processes saved it)."""
  import jax
  import orbax.checkpoint as ocp
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  path = (workdir / 'checkpoints' / str(step) / 'default').absolute()
  with ocp.StandardCheckpointer() as ckpt:
    meta = ckpt.metadata(path)
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
        getattr(meta, 'item_metadata', meta))
    return ckpt.restore(path, target)


def assert_same_state(state, expected) -> None:
  """The same arrays, each within 1e-4 of its largest entry: sums over the
  batch (gradients, hence the momentum) cancel in single entries; those of
  the biases before batch norm are zero but for rounding."""
  import jax
  leaves = jax.tree_util.tree_leaves_with_path(expected)
  assert len(leaves) == len(jax.tree.leaves(state)) > 20
  for path, want in leaves:
    got = state
    for key in path:
      got = got[key.key]
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=1e-4 * np.abs(want).max() + 1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_four_devices_checkpoint_holds_the_same_state(runs):
  """The state saved from 4 devices, read back onto one: the same step,
  parameters, optimiser state and batch-norm statistics as the 1-device
  run's."""
  state = read_state(runs['four'][0], 3)
  assert int(state['step']) == 3
  assert 'bn2' in state['batch_stats']
  assert_same_state(state, read_state(runs['one'][0], 3))


def test_batch_that_does_not_divide_is_refused(runs):
  workdir, status, out, err = runs['batch6']
  assert status == 2
  assert err.strip().splitlines() == [
      'error: train.batch_size=6 cannot be split among the 4 devices: every '
      'batch is split evenly across them; use a multiple of 4']
  assert not workdir.exists()

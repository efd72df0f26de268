"""cnn_lab.seed_group: seeds trained together, against the same runs
trained one by one; refusals; resume from uneven checkpoints; a diverging
seed; oneDNN's convolutions under vmap; the seeds bench's arithmetic."""

import hashlib
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_lab import kernels, seed_group, train, writers
from cnn_lab.bench import seeds as seeds_bench
from cnn_lab.errors import ConfigError
from cnn_lab.kernels import onednn
from configs import lenet5

# LeNet-5 at half width, batch 8: 6 steps, a line every 2nd step,
# evaluations at 3 and 6, checkpoints at 2, 4 and 6, histograms at 1 and 3.
TINY = {'model.width': 0.5, 'train.num_steps': 6, 'train.batch_size': 8,
        'log_every_steps': 2, 'eval_every_steps': 3, 'eval_num_examples': 40,
        'eval_batch_size': 20, 'probe_batch_size': 16,
        'checkpoint_every_steps': 2, 'histogram_every_steps': 3}
SEEDS = (0, 1)
RTOL, ATOL = 1e-4, 1e-5


def configure(seed, **more):
  config = lenet5.get_config()
  for key, value in {**TINY, 'seed': seed, **more}.items():
    node = config
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  return config


def final_params(workdir: pathlib.Path) -> dict:
  """The arrays of the newest checkpoint, read back by orbax alone."""
  import orbax.checkpoint as ocp
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                 if p.name.isdigit())
  restored = ocp.StandardCheckpointer().restore(
      workdir / 'checkpoints' / str(steps[-1]) / 'default')
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(restored)}


def assert_same_run(ours: pathlib.Path, theirs: pathlib.Path) -> None:
  """Same metric lines (keys, steps, strings; numbers within float
  tolerance), same final checkpoint, same description files."""
  a, b = writers.read_metrics(ours), writers.read_metrics(theirs)
  assert [sorted(l) for l in a] == [sorted(l) for l in b]
  for x, y in zip(a, b):
    for key, value in x.items():
      if isinstance(value, float):
        np.testing.assert_allclose(value, y[key], rtol=RTOL, atol=ATOL,
                                   err_msg=f'{key} at step {x["step"]}')
      else:
        assert value == y[key], (key, x['step'])
  pa, pb = final_params(ours), final_params(theirs)
  assert pa.keys() == pb.keys() and len(pa) > 10
  for key in pa:
    np.testing.assert_allclose(pa[key], pb[key], rtol=RTOL, atol=ATOL,
                               err_msg=key)
  for name in ('config.json', 'layers.json', 'activations.json'):
    assert (ours / name).read_text() == (theirs / name).read_text(), name


def digest(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The two seeds as a group, and each alone with train_and_evaluate."""
  root = tmp_path_factory.mktemp('seeds')
  group = seed_group.train_seed_group(
      [configure(s) for s in SEEDS], [root / f'group{s}' for s in SEEDS])
  alone = [train.train_and_evaluate(configure(s), root / f'alone{s}')
           for s in SEEDS]
  return root, group, alone


def test_group_trains_each_seed_as_its_own_run(runs):
  root, group, alone = runs
  for seed, ours, theirs in zip(SEEDS, group, alone):
    assert_same_run(root / f'group{seed}', root / f'alone{seed}')
    assert json.loads((root / f'group{seed}' / 'config.json').read_text())[
        'seed'] == seed
    assert ours.keys() == theirs.keys() == {'eval/loss', 'eval/accuracy'}
    for key in ours:
      assert ours[key] == pytest.approx(theirs[key], rel=RTOL, abs=ATOL)
    last = [l for l in writers.read_metrics(root / f'group{seed}')
            if 'eval/loss' in l][-1]
    assert ours == {k: last[k] for k in ours}
    for folder in ('plots', 'checkpoints'):
      names = lambda w: sorted(p.name for p in (w / folder).iterdir())
      assert names(root / f'group{seed}') == names(root / f'alone{seed}')
    # TensorBoard: one file of events (scalars and histograms).
    (events,) = (root / f'group{seed}' / 'tensorboard').iterdir()
    assert events.name.startswith('events.out.tfevents.')
    assert len(list((root / f'group{seed}' / 'plots').glob('*.png'))) >= 5
  # Every logged line holds the per-layer statistics; the two seeds
  # trained apart (their own data, initialisation and dropout).
  lines = [writers.read_metrics(root / f'group{s}') for s in SEEDS]
  assert [l['step'] for l in lines[0]] == [2, 3, 4, 6, 6]
  assert len([k for k in lines[0][0] if k.startswith('grad_norm/')]) > 2
  assert lines[0][0]['train/loss'] != lines[1][0]['train/loss']


def test_finished_group_is_left_alone(runs, monkeypatch):
  root, group, _ = runs
  before = {s: digest(root / f'group{s}') for s in SEEDS}

  def no_compiling(*args):
    raise AssertionError('a finished group compiled its steps')

  monkeypatch.setattr(seed_group, 'compile_group_steps', no_compiling)
  again = seed_group.train_seed_group(
      [configure(s) for s in SEEDS], [root / f'group{s}' for s in SEEDS])
  assert again == group
  for s in SEEDS:
    after = digest(root / f'group{s}')
    assert {k: v for k, v in after.items() if not k.startswith('plots')} == {
        k: v for k, v in before[s].items() if not k.startswith('plots')}


def test_configs_that_differ_beyond_seed_are_refused(tmp_path):
  workdirs = [tmp_path / 'a', tmp_path / 'b']
  cases = [
      ([configure(0), configure(1, **{'optim.learning_rate': 0.5})],
       'differ only in seed, but run 1 .* optim.learning_rate=0.5 where the '
       'first has 0.05'),
      ([configure(0), configure(0)], 'seed=0 twice'),
      ([configure(0)], 'one workdir per config'),
  ]
  for configs, message in cases:
    with pytest.raises(ConfigError, match=message):
      seed_group.train_seed_group(configs, workdirs)
  with pytest.raises(ConfigError, match='the workdir'):
    seed_group.train_seed_group([configure(0), configure(1)],
                                [tmp_path / 'a', tmp_path / 'a'])
  assert not any(tmp_path.iterdir())  # Nothing written.


def test_resume_from_uneven_checkpoints(runs, tmp_path, capsys,
                                       monkeypatch):
  # As if interrupted: seed 0 holds checkpoints up to step 4, seed 1 up to
  # step 2. Seed 1 trains steps 3-4 alone, then both together.
  root, group, _ = runs
  for seed, drop in zip(SEEDS, (('6',), ('4', '6'))):
    shutil.copytree(root / f'group{seed}', tmp_path / f'group{seed}')
    for step in drop:
      shutil.rmtree(tmp_path / f'group{seed}' / 'checkpoints' / step)
  monkeypatch.setattr(train.plots, 'plot_run', lambda workdir: [])
  resumed = seed_group.train_seed_group(
      [configure(s) for s in SEEDS], [tmp_path / f'group{s}' for s in SEEDS])
  out = capsys.readouterr().out
  assert 'resumed from the checkpoint of step 4' in out
  assert 'resumed from the checkpoint of step 2' in out
  assert 'for 1 seed in' in out and 'for 2 seeds in' in out
  for seed, ours, theirs in zip(SEEDS, resumed, group):
    assert_same_run(tmp_path / f'group{seed}', root / f'alone{seed}')
    for key in ours:
      assert ours[key] == pytest.approx(theirs[key], rel=RTOL, abs=ATOL)


def test_a_diverging_seed_halts_alone(runs, tmp_path, monkeypatch):
  # Seed 1 starts from NaN weights: it diverges at step 1 and halts at its
  # first logged step; seed 0 trains on as it would alone. The unlogged
  # steps take the step without statistics (which looks for where the
  # NaN started by a second forward pass).
  root, _, alone = runs
  build_run = train.build_run

  def poisoned(config, options, datasets=None):
    run, state = build_run(config, options, datasets)
    if config.seed == 1:
      state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan,
                                                state.params))
    return run, state

  monkeypatch.setattr(train, 'build_run', poisoned)
  monkeypatch.setattr(train, 'MIN_UNLOGGED_STEPS', 3)
  with pytest.raises(seed_group.Diverged, match='seed=1: the run diverged: '
                     'non-finite values at step 1') as e:
    seed_group.train_seed_group([configure(s) for s in SEEDS],
                                [tmp_path / f'group{s}' for s in SEEDS])
  assert e.value.results[1] is None
  assert e.value.results[0] == pytest.approx(alone[0], rel=RTOL, abs=ATOL)
  assert_same_run(tmp_path / 'group0', root / 'alone0')
  (line,) = writers.read_metrics(tmp_path / 'group1')
  assert line['step'] == 2 and line['nonfinite/first_step'] == 1
  assert not list((tmp_path / 'group1' / 'checkpoints').iterdir())
  assert list((tmp_path / 'group1' / 'plots').glob('*.png'))


@pytest.mark.skipif(not onednn.available(), reason='oneDNN not built here')
def test_onednn_convolutions_under_vmap():
  # Three seeds' convolutions in one call each (forward, dx, dw), against
  # XLA's convolution of each seed alone; also an unbatched kernel and a
  # vmap inside a vmap.
  rng = np.random.default_rng(0)
  k = 3
  for shape, kernel, strides, padding in (
      ((5, 9, 9, 3), (3, 3, 3, 4), (1, 1), 'SAME'),
      ((4, 8, 8, 2), (5, 5, 2, 6), (2, 2), 'VALID')):
    x = jnp.asarray(rng.normal(size=(k, *shape)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, *kernel)), jnp.float32)

    def loss(impl):
      return lambda a, b: jnp.sum(jnp.sin(kernels.conv2d(
          a, b, strides, padding, impl=impl)))

    grads = jax.value_and_grad(loss('onednn'), argnums=(0, 1))
    got = jax.jit(jax.vmap(grads))(x, w)
    shared = jax.vmap(grads, in_axes=(0, None))(x, w[0])
    nested = jax.vmap(jax.vmap(loss('onednn')))(x[:, None], w[:, None])
    for i in range(k):
      want = jax.value_and_grad(loss('xla'), argnums=(0, 1))(x[i], w[i])
      for a, b in zip(jax.tree.leaves(want),
                      jax.tree.leaves(seed_group.unstack(got, i))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
      want_shared = jax.value_and_grad(loss('xla'), argnums=(0, 1))(
          x[i], w[0])
      for a, b in zip(jax.tree.leaves(want_shared),
                      jax.tree.leaves(seed_group.unstack(shared, i))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(nested[i, 0], want[0], rtol=1e-4)


def test_bench_ratios_from_round_times():
  # Seconds per call (k seeds' steps) in three rounds: the medians, the
  # ratios separate / vmapped, and the weighting of a run logging every 50.
  per_round = {'separate off': [0.8, 0.9, 1.0], 'vmapped off': [0.5, 0.3, 0.4],
               'separate on': [1.2, 1.0, 1.1], 'vmapped on': [0.6, 0.5, 0.7]}
  # CPU time of each call on a fake clock: (steps, seconds); the two warm
  # calls are left out of the median.
  now = [0.0]
  runs, calls = seeds_bench.with_cpu_time(
      {label: (lambda n, s=s: now.__setitem__(0, now[0] + n * s))
       for label, s in (('separate off', 0.2), ('vmapped off', 0.1),
                        ('separate on', 0.3), ('vmapped on', 0.2))},
      clock=lambda: now[0])
  for label, run in runs.items():
    for n in (1, 1, 3, 1, 2):
      run(n)
  now[0] += 99  # Not inside any call.
  runs['vmapped off'](4)
  out = seeds_bench.summarize(per_round, k=4, cpu_calls=calls)
  assert calls['separate off'][2] == (3, pytest.approx(0.6))
  assert out['cpu_ms_per_step_of_k_seeds'] == pytest.approx(
      {'separate off': 200, 'vmapped off': 100, 'separate on': 300,
       'vmapped on': 200})
  assert out['ms_per_step_of_k_seeds'] == pytest.approx(
      {'separate off': 900, 'vmapped off': 400, 'separate on': 1100,
       'vmapped on': 600})
  assert out['ms_per_step_per_seed']['vmapped off'] == pytest.approx(100)
  assert out['ratio']['off'] == pytest.approx(0.9 / 0.4)
  assert out['ratio']['on'] == pytest.approx(1.1 / 0.6)
  assert out['ratio_per_round']['off'] == pytest.approx([1.6, 3.0, 2.5])
  assert out['ratio']['at_log_50'] == pytest.approx(
      (49 * 0.9 + 1.1) / (49 * 0.4 + 0.6))
  result = {'model': 'lenet5', 'k': 4, 'batch': 128, 'compile_seconds': {
      f'{a} {b}': 1.0 for a in ('separate', 'vmapped') for b in ('off', 'on')},
            'peak_mib_xla_estimate': {'separate off': 7.0,
                                      'vmapped off': 28.0}, **out}
  table = seeds_bench.format_markdown(
      {'machine': 'm', 'jax': 'j', 'backend': 'cpu', 'xla_flags': '',
       'malloc': 'tcmalloc', 'vmap_method': 'broadcast_all', 'rounds': 3,
       'date': 'd'}, [result])
  assert '| lenet5 | 4, 128 | 900.0 / 1,100.0 | 400.0 / 600.0 | **2.25** ' \
         '(1.60-3.00) | **1.83** (1.57-2.00) | 2.24 | 200.0 / 100.0 |' in table

"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The only code that reads the root config. A run goes through stages, each
a function with one job:

  validate_config   every check that needs no data, before anything is
                    built or written (a bad config leaves nothing behind)
  build_run         dataset, model, optimiser, the initial state, and the
                    names of its layers, activation sites and BN layers
  prepare_workdir   refuses another config's run, or finds this one to
                    resume; writes config.json, layers.json, activations.json
  restore           the latest complete checkpoint, and the metric lines up
                    to its step
  compile_steps     the jitted steps, compiled once, before the loop
  train_loop        per step: histograms, the step, its line, evaluation
                    and checkpoint when they are due
  finish            files closed, plots drawn from them

Below it, sub-configs go in as keyword arguments (`make_datasets(
**config.data)`, `create_model(...)`, `make_optimizer(**config.optim)`);
the step functions themselves are `cnn_lab.steps`.

With several devices the batches are split among them and the steps run
on all (`cnn_lab.distributed`; with one, the program is the same as
without it); in a run of several processes only process 0 writes the
files.
"""

import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import pathlib
import shutil
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cnn_lab import checkpoints as checkpoints_lib
from cnn_lab import data as data_lib
from cnn_lab import distributed
from cnn_lab import metrics as metrics_lib
from cnn_lab import models, optim, plots, writers
from cnn_lab import steps as steps_lib
from cnn_lab.errors import ConfigError, check_choice, check_positive

ON_NONFINITE = ('halt', 'skip')

# A run with at least this many unlogged steps runs them
# without per-layer statistics, in a second compiled version of the step.
# Statistics make a step 1.05-1.29x slower on the CPU and 1.14-1.64x on a
# GPU (`python -m cnn_lab.bench`); the second compilation pays for itself
# after ~100-700 unlogged steps on the CPU (ResNet-20 to LeNet-5) and
# ~3,200-21,000 on an H200 (ResNet-50 float32 to VGG16-BN bfloat16).
MIN_UNLOGGED_STEPS = 1000

# Everything a run writes into its workdir (--overwrite deletes these;
# done.json is the mark cnn_lab.sweeps leaves on a finished run).
RUN_FILES = ('config.json', 'layers.json', 'activations.json',
             'metrics.jsonl', 'tensorboard', 'plots', 'checkpoints',
             'checkpoints_damaged', 'done.json')


class Diverged(Exception):
  """The loss or a gradient became non-finite under on_nonfinite='halt'."""


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path | None,
                       overwrite: bool = False) -> dict:
  """Trains `config` into `workdir`; returns the final evaluation metrics.

  A workdir that already holds a run of the same config is resumed from its
  latest complete checkpoint (a finished run is left as it is); one that
  holds another config is refused, unless `overwrite` deletes that run.
  Raises ConfigError for an invalid config, Diverged when on_nonfinite is
  'halt' and the run diverged.
  """
  workdir = pathlib.Path(workdir) if workdir else default_workdir(config)
  options = validate_config(config, workdir)
  run, state = build_run(config, options)
  # Process 0 writes the files; every process learns whether it resumes.
  resume = distributed.on_main(prepare_workdir, workdir, run, state,
                               overwrite)
  state, start, checkpoints = restore(workdir, state, resume, options)
  if start >= run.num_steps:
    checkpoints.close()
    print(f'  the run was already complete ({run.num_steps} steps)',
          flush=True)
    return _last_evaluation(workdir)
  outputs = Outputs(writers.MetricsWriter(workdir, metric_keys(run))
                    if distributed.is_main() else _NoWriter(workdir),
                    checkpoints)
  t_begin = time.perf_counter()
  batches = data_lib.prefetch(
      run.datasets.train.train_batches(run.batch_size, run.seed,
                                       start_step=start),
      size=3, transform=distributed.put_batch)
  first = next(batches)
  steps = compile_steps(run, state, first, t_begin)
  eval_result = train_loop(run, steps, state, start,
                           itertools.chain([first], batches), outputs)
  finish(outputs, t_begin, run.options.plots)
  return {k: float(v) for k, v in eval_result.items()}


# --- validate_config ---


@dataclasses.dataclass(frozen=True)
class Options:
  """The run's settings outside the sub-configs, validated."""
  layer_stats: bool
  probe_batch_size: int
  checkpoint_keep: int
  on_nonfinite: str
  aux_loss_weight: float
  plots: bool = True


def validate_config(config, workdir: pathlib.Path) -> Options:
  """Every check that needs no data: the run's own settings, the workdir,
  the model's knobs, the optimiser and the step count. Raises ConfigError
  naming the first problem."""
  for field in ('log_every_steps', 'eval_every_steps',
                'histogram_every_steps', 'checkpoint_every_steps'):
    value = config.get(field, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ConfigError(f'{field}={value!r} is not allowed; it must be an '
                        'integer >= 0 (0: ' + (
                            'off)' if field.startswith('hist')
                            else 'only at the end)'))
  for field in ('layer_stats', 'plots', 'log_first_step'):
    value = config.get(field, field != 'log_first_step')
    if not isinstance(value, bool):
      raise ConfigError(f'{field}={value!r} is not allowed; it must be True '
                        'or False')
  layer_stats = config.get('layer_stats', True)
  probe_size = config.get('probe_batch_size', 256)
  check_positive('probe_batch_size', probe_size, integer=True)
  checkpoint_keep = config.get('checkpoint_keep', 3)
  check_positive('checkpoint_keep', checkpoint_keep, integer=True)
  on_nonfinite = config.get('on_nonfinite', 'halt')
  check_choice('on_nonfinite', on_nonfinite, ON_NONFINITE)
  if not isinstance(config.seed, int):
    raise ConfigError(f'seed={config.seed!r} is not allowed; it must be an '
                      'integer')
  aux_loss_weight = config.train.get('aux_loss_weight', 0.3)
  if (not isinstance(aux_loss_weight, (int, float))
      or isinstance(aux_loss_weight, bool) or not aux_loss_weight >= 0
      or not math.isfinite(aux_loss_weight)):
    raise ConfigError(f'train.aux_loss_weight={aux_loss_weight!r} is not '
                      'allowed; it must be a number >= 0')
  _check_workdir_writable(workdir)
  # Model knobs and optimiser next: they need no data, and loading a
  # dataset takes seconds.
  model_cfg = config.model.to_dict()
  models.create_model(**{**model_cfg, 'num_classes': 1 if model_cfg.get(
      'num_classes') is None else model_cfg['num_classes']})
  optim.make_optimizer(**config.optim, num_steps=1)
  check_positive('train.batch_size', config.train.batch_size, integer=True)
  if config.train.get('num_steps') is not None:
    check_positive('train.num_steps', config.train.num_steps, integer=True)
  check_positive('eval_batch_size', config.eval_batch_size, integer=True)
  return Options(layer_stats=layer_stats, probe_batch_size=probe_size,
                 checkpoint_keep=checkpoint_keep, on_nonfinite=on_nonfinite,
                 aux_loss_weight=aux_loss_weight,
                 plots=config.get('plots', True))


def _check_workdir_writable(workdir: pathlib.Path) -> None:
  """The workdir, or the nearest folder above it that exists, must be a
  folder this process can write into (checked before anything is built)."""
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f'workdir {workdir} exists and is not a folder')
  existing = workdir
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise ConfigError(f'cannot create the workdir {workdir}: {existing} is '
                      'not a folder')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f'cannot write the workdir {workdir}: {existing} is '
                      'not writable')



def default_workdir(config) -> pathlib.Path:
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return pathlib.Path('runs') / f'{config.name}-{stamp}'


def _check_train_config(train_cfg, num_train_examples: int) -> int:
  """Validates config.train; returns the number of steps to run."""
  check_positive('train.batch_size', train_cfg.batch_size, integer=True)
  if train_cfg.batch_size > num_train_examples:
    raise ConfigError(
        f'train.batch_size={train_cfg.batch_size} is larger than the '
        f'training split ({num_train_examples} examples)')
  if train_cfg.get('num_steps') is not None:
    check_positive('train.num_steps', train_cfg.num_steps, integer=True)
    return train_cfg.num_steps
  if train_cfg.get('num_epochs') is None:
    raise ConfigError('set train.num_steps or train.num_epochs')
  check_positive('train.num_epochs', train_cfg.num_epochs)
  return steps_from_epochs(train_cfg.num_epochs, num_train_examples,
                           train_cfg.batch_size)


def steps_from_epochs(num_epochs: float, num_examples: int,
                      batch_size: int) -> int:
  """The one place that turns epochs into steps (last partial batch dropped)."""
  return max(1, int(num_epochs * (num_examples // batch_size)))


# --- build_run ---


@dataclasses.dataclass(frozen=True)
class Cadence:
  """Which steps log a line, evaluate, checkpoint and write histograms.
  Every `*_every` of 0 in the config means only the last step (histograms:
  never)."""
  num_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  histogram_every: int
  first: bool = False  # Also log step 1 (the gradients at initialisation).

  @classmethod
  def from_config(cls, config, num_steps: int) -> 'Cadence':
    return cls(num_steps=num_steps,
               first=config.get('log_first_step', False),
               log_every=config.get('log_every_steps', 0) or num_steps,
               eval_every=config.get('eval_every_steps', 0) or num_steps,
               checkpoint_every=(config.get('checkpoint_every_steps', 0)
                                 or num_steps),
               histogram_every=config.get('histogram_every_steps', 0))

  def logs(self, step: int) -> bool:
    return (step % self.log_every == 0 or step == self.num_steps
            or (self.first and step == 1))

  def evaluates(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.num_steps

  def checkpoints(self, step: int) -> bool:
    return step % self.checkpoint_every == 0 or step == self.num_steps

  def histograms(self, step: int) -> bool:
    return bool(self.histogram_every) and (
        step % self.histogram_every == 0 or step == 1)


@dataclasses.dataclass(frozen=True)
class Run:
  """What `build_run` makes of a config: everything the stages after it
  need, but the train state."""
  name: str
  options: Options
  cadence: Cadence
  datasets: Any  # data.Datasets
  model: nn.Module
  num_steps: int
  batch_size: int
  eval_batch_size: int
  eval_num_examples: int | None
  seed: int
  schedule: Callable  # The learning rate at a step.
  dropout_key: jax.Array
  probe_batch: dict
  layer_names: tuple[str, ...]  # Parameterised layers, forward order.
  sites: tuple[tuple[str, str], ...]  # (activation site, function).
  bn_layers: tuple[tuple[str, float, float], ...]
  resolved: dict  # The config as config.json holds it.


def build_run(config, options: Options, datasets=None
              ) -> tuple[Run, steps_lib.TrainState]:
  """The dataset, model and optimiser of `config`, the initial train state,
  and the layer, site and batch-norm names the statistics are keyed by.
  `datasets`: those of `config.data`, already loaded (cnn_lab.seed_group
  loads them once for its runs)."""
  # Every batch is split evenly among the devices (cnn_lab.distributed);
  # checked here, not in validate_config, which a sweep runs before its
  # runs, in a process that must leave the devices alone.
  distributed.check_batch_sizes(**{
      'train.batch_size': config.train.batch_size,
      'eval_batch_size': config.eval_batch_size,
      'probe_batch_size': options.probe_batch_size})
  datasets = datasets or data_lib.make_datasets(**config.data)
  model_cfg = config.model.to_dict()
  if model_cfg.get('num_classes') is None:
    model_cfg['num_classes'] = datasets.num_classes
  model = models.create_model(**model_cfg)
  num_steps = _check_train_config(config.train, len(datasets.train))
  tx, schedule = optim.make_optimizer(**config.optim, num_steps=num_steps)

  init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
  state = distributed.replicate(steps_lib.create_train_state(
      model, tx, datasets.image_shape, init_key))
  sample = (model, {'params': state.params, 'batch_stats': state.batch_stats},
            jnp.zeros((1, *datasets.image_shape), jnp.float32))
  resolved = config.to_dict()
  resolved['model']['num_classes'] = model_cfg['num_classes']
  run = Run(
      name=config.name, options=options,
      cadence=Cadence.from_config(config, num_steps), datasets=datasets,
      model=model, num_steps=num_steps, batch_size=config.train.batch_size,
      eval_batch_size=config.eval_batch_size,
      eval_num_examples=config.get('eval_num_examples'), seed=config.seed,
      schedule=schedule, dropout_key=distributed.replicate(dropout_key),
      probe_batch=distributed.put_batch(
          datasets.train.fixed_batch(options.probe_batch_size)),
      layer_names=tuple(metrics_lib.layer_order(*sample)),
      sites=tuple(metrics_lib.activation_sites(*sample)),
      bn_layers=tuple(metrics_lib.batch_norm_layers(*sample)),
      resolved=resolved)
  return run, state


# --- prepare_workdir ---


def prepare_workdir(workdir: pathlib.Path, run: Run,
                    state: steps_lib.TrainState, overwrite: bool) -> bool:
  """Creates the workdir and writes the run's description into it (config,
  layers, activation sites); True when it holds this run to resume."""
  resume = _check_existing_run(workdir, run.resolved, overwrite)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'plots').mkdir(exist_ok=True)
  writers.write_json_atomic(workdir / 'config.json', run.resolved)
  writers.write_json_atomic(workdir / 'layers.json', [
      {'name': name, 'kind': _layer_kind(name, state.params),
       'num_params': int(sum(x.size for x in jax.tree.leaves(
           metrics_lib.layer_params(state.params, name))))}
      for name in run.layer_names])
  writers.write_json_atomic(workdir / 'activations.json', [
      {'name': name, 'activation': kind} for name, kind in run.sites])
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'{run.name}: {run.resolved["model"]["name"]} with {num_params:,} '
        f'parameters, {run.datasets.name} {run.datasets.image_shape}, '
        f'{run.num_steps} steps of batch {run.batch_size}; workdir '
        f'{workdir}', flush=True)
  return resume


def _check_existing_run(workdir: pathlib.Path, resolved: dict,
                        overwrite: bool) -> bool:
  """True when `workdir` holds a run of this very config (resume it).

  A run of another config is refused with the differing fields, unless
  `overwrite`, which deletes that run's files. Nothing is changed on refusal.
  """
  config_path = workdir / 'config.json'
  if not config_path.exists():
    if (workdir / 'metrics.jsonl').exists():
      raise ConfigError(f'workdir {workdir} holds metrics but no config.json;'
                        ' choose another --workdir or delete it')
    return False
  try:
    old = json.loads(config_path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f'cannot read {config_path}: {e}') from None
  # Through JSON, so that tuples and lists compare equal.
  new = json.loads(json.dumps(resolved))
  differing = _differing_fields(old, new)
  if not differing:
    return True
  if not overwrite:
    shown = '; '.join(f'{k}: {a!r} there, {b!r} here'
                      for k, a, b in differing[:6])
    more = f' (and {len(differing) - 6} more)' if len(differing) > 6 else ''
    raise ConfigError(
        f'workdir {workdir} holds a run of another config: {shown}{more}. '
        'Choose another --workdir, or pass --overwrite to delete that run')
  for name in RUN_FILES:
    path = workdir / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()
  return False


def _differing_fields(old, new, prefix='') -> list[tuple[str, Any, Any]]:
  if not (isinstance(old, dict) and isinstance(new, dict)):
    return [] if old == new else [(prefix.rstrip('.'), old, new)]
  out = []
  for key in sorted(set(old) | set(new)):
    out += _differing_fields(old.get(key, '<absent>'),
                             new.get(key, '<absent>'), f'{prefix}{key}.')
  return out


def _layer_kind(name: str, params) -> str:
  leaves = metrics_lib.layer_params(params, name)
  if 'kernel' in leaves:
    return 'conv' if leaves['kernel'].ndim == 4 else 'dense'
  if 'scale' in leaves:
    return 'norm'
  return 'other'


# --- restore ---


def restore(workdir: pathlib.Path, state: steps_lib.TrainState, resume: bool,
            options: Options):
  """(state, start step, checkpoints): the latest complete checkpoint's
  state when resuming, and the metric lines up to its step kept (later
  ones were written after it and will be written again)."""
  checkpoints = checkpoints_lib.Checkpoints(
      workdir, keep=options.checkpoint_keep)
  if not resume:
    return state, 0, checkpoints
  state, start = checkpoints.restore_latest(state)
  kept = distributed.on_main(writers.truncate_metrics, workdir, start)
  if start:
    print(f'  resumed from the checkpoint of step {start} '
          f'({kept} metric lines kept)', flush=True)
  else:
    print(f'  no complete checkpoint in {workdir}: starting from step 0',
          flush=True)
  return state, start, checkpoints


def _last_evaluation(workdir: pathlib.Path) -> dict:
  """The eval/* metrics of a finished run's last evaluation line."""
  lines = [l for l in writers.read_metrics(workdir) if 'eval/loss' in l]
  return {k: float(v) for k, v in lines[-1].items()
          if k.startswith('eval/')} if lines else {}


def metric_keys(run: Run) -> list[str]:
  """The order of the keys in a metrics line."""
  return ['train/loss', 'train/aux_loss', 'train/accuracy',
          'train/learning_rate', 'probe/loss', 'probe/eval_mode_loss',
          'probe/bn_train_eval_gap', 'eval/loss', 'eval/accuracy',
          'nonfinite/first_step', 'nonfinite/first_activation',
          'nonfinite/first_grad_layer', 'grad_norm/global'] + [
              f'{stat}/{n}' for stat in metrics_lib.LAYER_STATS
              for n in run.layer_names] + [
              f'{stat}/{n}' for stat in metrics_lib.ACTIVATION_STATS
              for n, _ in run.sites] + [
              f'{stat}/{n}' for stat in metrics_lib.BN_STATS
              for n in run.layer_names]


# --- compile_steps ---


@dataclasses.dataclass(frozen=True)
class Steps:
  """A run's jitted steps. `train` holds the compiled train step, keyed by
  whether it computes the per-layer statistics: one version (that of
  `layer_stats`), or, in a run with statistics and MIN_UNLOGGED_STEPS
  unlogged steps or more, both, the one without them for the unlogged
  steps; both update the state alike."""
  train: dict[bool, Callable]
  histogram: Callable
  probe: Callable
  eval: Callable

  def train_step(self, step: int, cadence: Cadence) -> Callable:
    """The version of the train step that `step` runs."""
    if len(self.train) == 1:
      (only,) = self.train.values()
      return only
    return self.train[cadence.logs(step)]


def train_step_fn(run: Run, with_stats: bool, **kwargs) -> Callable:
  """The run's train step, with or without per-layer statistics, before
  jit (cnn_lab.seed_group vmaps it, with `kwargs` seed_axis)."""
  step_fn = functools.partial(
      steps_lib.train_step, layer_names=run.layer_names,
      activation_sites=run.sites, bn_layers=run.bn_layers,
      schedule=run.schedule, aux_loss_weight=run.options.aux_loss_weight,
      layer_stats=with_stats,
      skip_nonfinite=run.options.on_nonfinite == 'skip', **kwargs)
  step_fn.__name__ = 'train_step_with_stats' if with_stats else 'train_step'
  return step_fn


def histogram_fn(run: Run) -> Callable:
  """The run's histogram step, before jit."""
  return functools.partial(
      steps_lib.histogram_step, layer_names=run.layer_names,
      activation_sites=run.sites,
      aux_loss_weight=run.options.aux_loss_weight)


def train_step_versions(run: Run) -> set[bool]:
  """The versions of the train step the run compiles, keyed by whether
  they compute statistics (`Steps`)."""
  # Counted over the whole run, not from the resumed step: a resumed run
  # takes the same version at every step as the uninterrupted one, so it
  # stays exact.
  unlogged = sum(not run.cadence.logs(step)
                 for step in range(1, run.num_steps + 1))
  layer_stats = run.options.layer_stats
  split = layer_stats and unlogged >= MIN_UNLOGGED_STEPS
  return {True, False} if split else {layer_stats}


def compile_steps(run: Run, state, batch, t_begin: float) -> Steps:
  """Jits the steps, and compiles the train step(s) and the probe here, so
  that the first logged rate is the steps' own."""
  probe = distributed.jit(steps_lib.probe_step)
  jax.block_until_ready(probe(state, run.probe_batch))
  versions = train_step_versions(run)
  train = {v: distributed.jit(train_step_fn(run, v), donate_argnums=(0,))
           .lower(state, batch, run.dropout_key).compile()
           for v in versions}
  which = ' (with and without statistics)' if len(versions) > 1 else ''
  print(f'  compiled the train step{which} and the probe in '
        f'{time.perf_counter() - t_begin:.1f}s', flush=True)
  return Steps(
      train=train, histogram=distributed.jit(histogram_fn(run)),
      probe=probe, eval=distributed.jit(steps_lib.eval_step))


# --- train_loop ---


@dataclasses.dataclass
class Outputs:
  """The run's open files: metric lines (and TensorBoard), checkpoints."""
  writer: writers.MetricsWriter
  checkpoints: checkpoints_lib.Checkpoints

  def close(self) -> None:
    self.writer.close()
    self.checkpoints.close()


class _NoWriter:
  """The metrics writer of the processes other than 0, which write
  nothing (`distributed.is_main`)."""

  def __init__(self, workdir: pathlib.Path):
    self.workdir = workdir

  def write(self, step: int, scalars) -> dict:
    return {'step': step, **scalars}

  def write_histograms(self, step: int, arrays) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def train_loop(run: Run, steps: Steps, state, start: int, batches,
               outputs: Outputs) -> dict:
  """Steps `start + 1` to the last; returns the last evaluation's metrics.
  Raises Diverged (outputs closed) when the run diverged under 'halt'."""
  cadence = run.cadence
  progress = Progress(run.num_steps, run.batch_size)
  reported = not distributed.is_main() or any(
      'nonfinite/first_step' in line
      for line in writers.read_metrics(outputs.writer.workdir))
  eval_result = {}
  for step in range(start + 1, run.num_steps + 1):
    batch = next(batches)
    if cadence.histograms(step):
      # Before the step, on its batch: the gradients it is about to apply.
      outputs.writer.write_histograms(step, jax.device_get(
          steps.histogram(state, batch, run.dropout_key)))
    state, scalars = steps.train_step(step, cadence)(state, batch,
                                                     run.dropout_key)
    if step == start + 1:  # Rates from here: step 1 compiled histograms.
      progress.start(state, step)
    if cadence.logs(step):
      reported = log_step(run, steps, state, step, scalars, outputs,
                          progress, reported)
    if cadence.evaluates(step):
      eval_result = evaluate(steps.eval, state, run.datasets.test,
                             run.eval_batch_size, run.eval_num_examples)
      outputs.writer.write(step, eval_result)
      print(f'  eval at step {step}: loss {eval_result["eval/loss"]:.4f}  '
            f'accuracy {eval_result["eval/accuracy"]:.4f}', flush=True)
    if cadence.checkpoints(step):
      # Never save a diverged state: halt first, keeping the last good one.
      _halt_if_diverged(run, jax.device_get(state.first_nonfinite), outputs)
      outputs.writer.flush()  # Every line of this step is on disk before it.
      outputs.checkpoints.save(state)
  return eval_result


def log_step(run: Run, steps: Steps, state, step: int, scalars, outputs,
             progress: 'Progress', reported: bool) -> bool:
  """Writes the step's line (its scalars and the probe's), prints progress,
  and halts a diverged run; returns whether the first non-finite step has
  been reported (it is, once, on the first line after it)."""
  scalars = jax.device_get({**scalars, **steps.probe(state, run.probe_batch)})
  first_bad = jax.device_get(state.first_nonfinite)
  if first_bad[0] >= 0 and not reported:
    reported = True
    scalars.update(_nonfinite_report(first_bad, run.layer_names, run.sites))
  line = outputs.writer.write(step, scalars)
  _halt_if_diverged(run, first_bad, outputs)
  print(progress.line(step, line), flush=True)
  return reported


class Progress:
  """Steps per second and the time left, measured between logged steps."""

  def __init__(self, num_steps: int, batch_size: int):
    self.num_steps, self.batch_size = num_steps, batch_size
    self.t_last, self.step_last = time.perf_counter(), 0

  def start(self, state, step: int) -> None:
    jax.block_until_ready(state)
    self.t_last, self.step_last = time.perf_counter(), step

  def line(self, step: int, line: dict) -> str:
    now = time.perf_counter()
    rate = ((step - self.step_last) / max(now - self.t_last, 1e-9)
            if step > self.step_last else 0)
    self.t_last, self.step_last = now, step
    eta = (self.num_steps - step) / rate if rate else 0
    return (f'  step {step:>{len(str(self.num_steps))}}/{self.num_steps}  '
            f'loss {_fmt(line["train/loss"])}  '
            f'acc {_fmt(line["train/accuracy"], 3)}'
            f'  probe loss {_fmt(line["probe/loss"])}'
            f'  | {rate:.2f} steps/s {rate * self.batch_size:.0f} img/s  '
            f'eta {_format_duration(eta)}')


def evaluate(eval_fn, state, pipeline, batch_size, num_examples) -> dict:
  """Loss and accuracy over the first `num_examples` test examples (all
  when None)."""
  totals = None
  for batch in data_lib.prefetch(
      pipeline.eval_batches(batch_size, num_examples), 2,
      distributed.put_batch):
    out = eval_fn(state, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  return {'eval/loss': totals['loss_sum'] / totals['count'],
          'eval/accuracy': totals['correct_sum'] / totals['count']}


def _halt_if_diverged(run: Run, first_bad, outputs: Outputs) -> None:
  """Raises Diverged when a non-finite value was recorded and on_nonfinite
  is 'halt', after closing the files and drawing the plots; the
  checkpoints on disk (all from before it) stay."""
  if (run.options.on_nonfinite != 'halt' or first_bad is None
      or first_bad[0] < 0):
    return
  outputs.writer.close()
  steps = outputs.checkpoints.steps()
  outputs.checkpoints.close()
  if distributed.is_main() and run.options.plots:
    plots.plot_run(outputs.writer.workdir)  # A diverged run is worth a look.
  kept = (f'the last good checkpoint is step {steps[-1]}' if steps
          else 'no checkpoint had been written yet')
  raise Diverged(
      f'the run diverged: non-finite values at step {first_bad[0]} '
      f'({_nonfinite_where(first_bad, run.layer_names, run.sites)}); '
      f'stopped ({kept}). Lower the learning rate, clip gradients '
      '(optim.grad_clip_norm), or set on_nonfinite=skip')


def _nonfinite_report(first_bad, layer_names, sites) -> dict:
  """The metrics-line keys for TrainState.first_nonfinite, and a warning."""
  step, layer, site = (int(v) for v in first_bad)
  keys = {'nonfinite/first_step': step}
  if site >= 0:
    keys['nonfinite/first_activation'] = sites[site][0]
  if layer >= 0:
    keys['nonfinite/first_grad_layer'] = layer_names[layer]
  print(f'  warning: non-finite values from step {step} on: '
        f'{_nonfinite_where(first_bad, layer_names, sites)}', flush=True)
  return keys


def _nonfinite_where(first_bad, layer_names, sites) -> str:
  _, layer, site = (int(v) for v in first_bad)
  where = []
  if site >= 0:
    where.append(f'the forward pass first at activation {sites[site][0]}')
  if layer >= 0:
    where.append(f'the backward pass first in layer {layer_names[layer]}')
  return '; '.join(where) or (
      'no NaN or inf in any gradient or activation: the loss or the global '
      'gradient norm overflowed float32')


def _fmt(value, digits: int = 4) -> str:
  """A metric for the progress line ('nan' and 'inf' arrive as strings)."""
  return f'{value:.{digits}f}' if isinstance(value, float) else str(value)


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


# --- finish ---


def finish(outputs: Outputs, t_begin: float, draw_plots: bool = True) -> None:
  """Closes the files and draws the run's plots from them (unless
  `draw_plots` is false: config.plots=False)."""
  outputs.close()
  workdir = outputs.writer.workdir
  plot_paths = (plots.plot_run(workdir)
                if distributed.is_main() and draw_plots else [])
  print(f'done in {_format_duration(time.perf_counter() - t_begin)}: '
        f'metrics {workdir / "metrics.jsonl"}, {len(plot_paths)} plots in '
        f'{workdir / "plots"}', flush=True)

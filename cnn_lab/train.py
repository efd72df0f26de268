"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The only code that reads the root config. Below it, sub-configs go in as
keyword arguments (`make_datasets(**config.data)`, `create_model(...)`,
`make_optimizer(**config.optim)`). Everything that can reject the config
(model knobs, optimiser, data) runs before the workdir is created, so a bad
config leaves nothing behind.
"""

import datetime
import functools
import json
import math
import os
import pathlib
import shutil
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.training import train_state

from cnn_lab import data as data_lib
from cnn_lab import metrics as metrics_lib
from cnn_lab import checkpoints as checkpoints_lib
from cnn_lab import layers, models, optim, plots, writers
from cnn_lab.errors import ConfigError, check_choice, check_positive


class TrainState(train_state.TrainState):
  """Parameters, optimiser state and step, plus batch-norm statistics
  (an empty dict for models without batch norm: one code path for all) and
  where non-finite values first appeared: the step, and the indices (in
  forward order) of the layer whose gradient and of the activation site
  where they started (`metrics.nonfinite_origin`), -1 where none; all -1
  while every gradient has been finite."""
  batch_stats: Any = flax.core.FrozenDict()
  first_nonfinite: jax.Array = None  # [step, grad layer, activation site].
  skipped_steps: jax.Array = None  # Updates dropped by on_nonfinite='skip'.


def steps_from_epochs(num_epochs: float, num_examples: int,
                      batch_size: int) -> int:
  """The one place that turns epochs into steps (last partial batch dropped)."""
  return max(1, int(num_epochs * (num_examples // batch_size)))


def create_train_state(model, tx, image_shape, key) -> TrainState:
  # Non-partitionable threefry: the same keys on one device, and XLA
  # compiles the initialisation of a large network (GoogLeNet: ~130 arrays)
  # about 3x faster (measured 11s against 36s on 2 CPU cores).
  with jax.threefry_partitionable(False):
    variables = jax.jit(functools.partial(model.init, train=False))(
        key, jnp.zeros((1, *image_shape), jnp.float32))
  return TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      batch_stats=variables.get('batch_stats', {}),
      first_nonfinite=jnp.full((3,), -1, jnp.int32),
      skipped_steps=jnp.zeros((), jnp.int32))


def _variables(state: TrainState, params) -> dict:
  if state.batch_stats:
    return {'params': params, 'batch_stats': state.batch_stats}
  return {'params': params}


def _loss_and_grads(state: TrainState, batch, key, aux_loss_weight: float,
                    collections=()):
  """Gradients of the training objective, and what the forward pass left
  in the mutable `collections` (besides batch stats and auxiliary logits).

  Models with auxiliary classifiers (GoogLeNet's `aux_heads`) sow their
  logits into the 'aux_logits' collection in training; their cross-entropy,
  times `aux_loss_weight`, is added to the objective and returned as
  `aux_loss`, while `loss` stays the main classifier's loss so that runs
  with and without auxiliary heads compare directly.
  """
  mutable = ['aux_logits', *collections] + (
      ['batch_stats'] if state.batch_stats else [])

  def loss_fn(params):
    logits, new_vars = state.apply_fn(
        _variables(state, params), batch['image'], train=True,
        rngs={'dropout': key}, mutable=mutable)
    loss = metrics_lib.cross_entropy(logits, batch['label']).mean()
    aux_logits = jax.tree.leaves(new_vars.get('aux_logits', {}))
    aux_loss = None
    objective = loss
    if aux_logits:
      aux_loss = aux_loss_weight * sum(
          metrics_lib.cross_entropy(a, batch['label']).mean()
          for a in aux_logits)
      objective = loss + aux_loss
    return objective, (loss, aux_loss, logits, new_vars)

  (_, (loss, aux_loss, logits, new_vars)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  return loss, aux_loss, logits, new_vars, grads


def train_step(state: TrainState, batch, dropout_key, *, layer_names,
               schedule, activation_sites=(), bn_layers=(),
               aux_loss_weight: float = 0.3, layer_stats: bool = True,
               skip_nonfinite: bool = False):
  """One optimiser step; returns the new state and a flat dict of scalars.

  With `layer_stats`, the scalars include every per-layer statistic of
  `metrics` (gradients, weights, updates, activations; batch norm for
  `bn_layers`, see `metrics.batch_norm_layers`): all reductions of tensors
  the step computes anyway. Without, the step computes only the loss,
  accuracy and global gradient norm, and looks at single layers only when
  that norm is not finite (then it runs the forward pass again to find the
  first non-finite activation). Either way the state records the first
  step whose loss or global gradient norm is not finite, and where the NaN
  or inf started (`metrics.nonfinite_origin`; nowhere when finite gradients
  overflowed the norm). With `skip_nonfinite`, such a step changes nothing
  but the step counter and `skipped_steps`. Both versions update the state
  alike; `train_and_evaluate` runs the one with statistics on logged steps.
  """
  # A fresh dropout mask every step, derived from the step number so that a
  # resumed run draws the same masks as an uninterrupted one.
  key = jax.random.fold_in(dropout_key, state.step)
  collections = [layers.ACTIVATION_STATS] if layer_stats else []
  loss, aux_loss, logits, new_vars, grads = _loss_and_grads(
      state, batch, key, aux_loss_weight, collections)
  new_state = state.apply_gradients(
      grads=grads, batch_stats=new_vars.get('batch_stats', state.batch_stats))

  scalars = {
      'train/loss': loss,
      'train/accuracy': metrics_lib.accuracy(logits, batch['label']).mean(),
      'train/learning_rate': schedule(state.step),
      'grad_norm/global': metrics_lib.global_l2_norm(grads),
  }
  if aux_loss is not None:  # The model has auxiliary heads.
    scalars['train/aux_loss'] = aux_loss
  act_means = ()
  if layer_stats:
    scalars.update(metrics_lib.compute_grad_stats(grads, layer_names))
    scalars.update(metrics_lib.compute_layer_stats(
        grads, state.params, new_state.params, layer_names))
    scalars.update(metrics_lib.collect_activation_stats(
        new_vars.get(layers.ACTIVATION_STATS, {}), activation_sites))
    act_means = [scalars[f'act_mean/{name}'] for name, _ in activation_sites]
    if state.batch_stats:
      scalars.update(metrics_lib.bn_gap_stats(
          state.batch_stats, new_state.batch_stats, bn_layers))

  # A step is non-finite when its loss or its global gradient norm is. That
  # norm also overflows on finite gradients too large to square in float32:
  # then no layer or activation holds the NaN or inf (origin -1, -1), but
  # the step counts all the same, as on_nonfinite='skip' drops it.
  ok = jnp.isfinite(scalars['grad_norm/global']) & jnp.isfinite(loss)
  # Where non-finite values started, looked for only when there are some.
  def where_nonfinite():
    means = act_means
    if not layer_stats and activation_sites:
      means = _activation_means(state, batch, key, activation_sites)
    return metrics_lib.nonfinite_origin(grads, layer_names, means)

  origin = jax.lax.cond(ok, lambda: jnp.full((2,), -1, jnp.int32),
                        where_nonfinite)
  first = jnp.concatenate([
      jnp.asarray(state.step, jnp.int32)[None] + 1, origin])
  new_state = new_state.replace(first_nonfinite=jnp.where(
      (state.first_nonfinite[0] < 0) & ~ok, first, state.first_nonfinite))
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(
        lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = new_state.replace(
        params=keep(new_state.params, state.params),
        opt_state=keep(new_state.opt_state, state.opt_state),
        batch_stats=keep(new_state.batch_stats, state.batch_stats),
        skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32))
    scalars['train/skipped_steps'] = new_state.skipped_steps
  return new_state, scalars


def _activation_means(state: TrainState, batch, key, sites) -> list:
  """The mean output of each activation site in the training-mode forward
  pass `train_step` took (same weights, batch and dropout mask)."""
  mutable = [layers.ACTIVATION_STATS] + (
      ['batch_stats'] if state.batch_stats else [])
  _, new_vars = state.apply_fn(
      _variables(state, state.params), batch['image'], train=True,
      rngs={'dropout': key}, mutable=mutable)
  stats = metrics_lib.collect_activation_stats(
      new_vars[layers.ACTIVATION_STATS], sites)
  return [stats[f'act_mean/{name}'] for name, _ in sites]


def histogram_step(state: TrainState, batch, dropout_key, *, layer_names,
                   activation_sites, aux_loss_weight: float = 0.3):
  """The gradient of each layer (its arrays flattened into one vector) and
  each activation site's output, for the step `train_step` is about to take
  on the same batch (same dropout mask). Called only every
  `histogram_every_steps`, so the train step itself never returns tensors."""
  key = jax.random.fold_in(dropout_key, state.step)
  *_, new_vars, grads = _loss_and_grads(
      state, batch, key, aux_loss_weight, [layers.ACTIVATION_VALUES])
  out = {}
  for name in layer_names:
    out[f'grads/{name}'] = jnp.concatenate([
        x.ravel() for x in jax.tree.leaves(
            metrics_lib.layer_params(grads, name))])
  acts = new_vars[layers.ACTIVATION_VALUES]
  for name, _ in activation_sites:
    out[f'activations/{name}'] = metrics_lib.layer_params(acts, name)[
        'value']
  return out


def probe_step(state: TrainState, batch) -> dict:
  """The cost on a fixed probe batch with dropout switched off.

  `probe/loss`: training mode (batch norm on the probe batch's statistics),
  dropout off: the objective without dropout's noise, a function that stays
  the same from step to step. With batch norm also `probe/eval_mode_loss`
  (moving averages, as in inference) and `probe/bn_train_eval_gap`, the
  eval-mode loss minus the training-mode one.
  """

  def without_dropout(next_fun, args, kwargs, context):
    if (isinstance(context.module, nn.Dropout)
        and context.method_name == '__call__'):
      return args[0]  # The identity: keep probability 1.
    return next_fun(*args, **kwargs)

  variables = _variables(state, state.params)
  with nn.intercept_methods(without_dropout):
    if state.batch_stats:  # Updated statistics are thrown away.
      logits, _ = state.apply_fn(variables, batch['image'], train=True,
                                 mutable=['batch_stats'])
    else:
      logits = state.apply_fn(variables, batch['image'], train=True)
  loss = metrics_lib.cross_entropy(logits, batch['label']).mean()
  out = {'probe/loss': loss}
  if state.batch_stats:
    eval_logits = state.apply_fn(variables, batch['image'], train=False)
    eval_loss = metrics_lib.cross_entropy(eval_logits, batch['label']).mean()
    out['probe/eval_mode_loss'] = eval_loss
    out['probe/bn_train_eval_gap'] = eval_loss - loss
  return out


def eval_step(state: TrainState, batch):
  """Sums of loss and correct predictions over the unmasked examples."""
  logits = state.apply_fn(_variables(state, state.params), batch['image'],
                          train=False)
  mask = batch['mask']
  return {
      'loss_sum': jnp.sum(metrics_lib.cross_entropy(logits, batch['label'])
                          * mask),
      'correct_sum': jnp.sum(metrics_lib.accuracy(logits, batch['label'])
                             * mask),
      'count': jnp.sum(mask),
  }


def evaluate(eval_fn, state, pipeline, batch_size, num_examples) -> dict:
  totals = None
  for batch in data_lib.prefetch(
      pipeline.eval_batches(batch_size, num_examples), 2, jax.device_put):
    out = eval_fn(state, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  return {'eval/loss': totals['loss_sum'] / totals['count'],
          'eval/accuracy': totals['correct_sum'] / totals['count']}


def _halt_if_diverged(first_bad, on_nonfinite, layer_names, sites,
                      checkpoints, writer) -> None:
  """Raises Diverged when a non-finite value was recorded and on_nonfinite
  is 'halt'; the checkpoints on disk (all from before it) stay."""
  if on_nonfinite != 'halt' or first_bad is None or first_bad[0] < 0:
    return
  writer.close()
  steps = checkpoints.steps()
  checkpoints.close()
  plots.plot_run(writer.workdir)  # A diverged run is worth looking at.
  kept = (f'the last good checkpoint is step {steps[-1]}' if steps
          else 'no checkpoint had been written yet')
  raise Diverged(
      f'the run diverged: non-finite values at step {first_bad[0]} '
      f'({_nonfinite_where(first_bad, layer_names, sites)}); stopped '
      f'({kept}). Lower the learning rate, clip gradients '
      '(optim.grad_clip_norm), or set on_nonfinite=skip')


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


# Everything a run writes into its workdir (--overwrite deletes these).
RUN_FILES = ('config.json', 'layers.json', 'activations.json',
             'metrics.jsonl', 'tensorboard', 'plots', 'checkpoints',
             'checkpoints_damaged')


def _differing_fields(old, new, prefix='') -> list[tuple[str, Any, Any]]:
  if not (isinstance(old, dict) and isinstance(new, dict)):
    return [] if old == new else [(prefix.rstrip('.'), old, new)]
  out = []
  for key in sorted(set(old) | set(new)):
    out += _differing_fields(old.get(key, '<absent>'),
                             new.get(key, '<absent>'), f'{prefix}{key}.')
  return out


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


ON_NONFINITE = ('halt', 'skip')


class Diverged(Exception):
  """The loss or a gradient became non-finite under on_nonfinite='halt'."""


# A run with at least this many unlogged steps runs them
# without per-layer statistics, in a second compiled version of the step.
# Statistics make a step 1.05-1.29x slower on the CPU and 1.14-1.64x on a
# GPU (`python -m cnn_lab.bench`); the second compilation pays for itself
# after ~100-700 unlogged steps on the CPU (ResNet-20 to LeNet-5) and
# ~3,200-21,000 on an H200 (ResNet-50 float32 to VGG16-BN bfloat16).
MIN_UNLOGGED_STEPS = 1000


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
  # --- Validate and build everything before touching the filesystem. ---
  for field in ('log_every_steps', 'eval_every_steps',
                'histogram_every_steps', 'checkpoint_every_steps'):
    value = config.get(field, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ConfigError(f'{field}={value!r} is not allowed; it must be an '
                        'integer >= 0 (0: ' + (
                            'off)' if field.startswith('hist')
                            else 'only at the end)'))
  layer_stats = config.get('layer_stats', True)
  if not isinstance(layer_stats, bool):
    raise ConfigError(f'layer_stats={layer_stats!r} is not allowed; it must '
                      'be True or False')
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
  workdir = pathlib.Path(workdir) if workdir else default_workdir(config)
  _check_workdir_writable(workdir)
  # Model knobs and optimiser first: they need no data, and loading a
  # dataset takes seconds.
  model_cfg = config.model.to_dict()
  models.create_model(**{**model_cfg, 'num_classes': 1 if model_cfg.get(
      'num_classes') is None else model_cfg['num_classes']})
  optim.make_optimizer(**config.optim, num_steps=1)
  check_positive('train.batch_size', config.train.batch_size, integer=True)
  if config.train.get('num_steps') is not None:
    check_positive('train.num_steps', config.train.num_steps, integer=True)

  datasets = data_lib.make_datasets(**config.data)
  if model_cfg.get('num_classes') is None:
    model_cfg['num_classes'] = datasets.num_classes
  model = models.create_model(**model_cfg)
  num_steps = _check_train_config(config.train, len(datasets.train))
  tx, schedule = optim.make_optimizer(**config.optim, num_steps=num_steps)
  batch_size = config.train.batch_size

  init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
  state = create_train_state(model, tx, datasets.image_shape, init_key)
  sample = (model, {'params': state.params, 'batch_stats': state.batch_stats},
            jnp.zeros((1, *datasets.image_shape), jnp.float32))
  layer_names = metrics_lib.layer_order(*sample)
  sites = tuple(metrics_lib.activation_sites(*sample))
  bn_layers = tuple(metrics_lib.batch_norm_layers(*sample))
  probe_batch = jax.device_put(datasets.train.fixed_batch(probe_size))

  resolved = config.to_dict()
  resolved['model']['num_classes'] = model_cfg['num_classes']
  resume = _check_existing_run(workdir, resolved, overwrite)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'plots').mkdir(exist_ok=True)
  writers.write_json_atomic(workdir / 'config.json', resolved)
  writers.write_json_atomic(workdir / 'layers.json', [
      {'name': name, 'kind': _layer_kind(name, state.params),
       'num_params': int(sum(x.size for x in jax.tree.leaves(
           metrics_lib.layer_params(state.params, name))))}
      for name in layer_names])
  writers.write_json_atomic(workdir / 'activations.json', [
      {'name': name, 'activation': kind} for name, kind in sites])
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'{config.name}: {model_cfg["name"]} with {num_params:,} parameters, '
        f'{datasets.name} {datasets.image_shape}, {num_steps} steps of '
        f'batch {batch_size}; workdir {workdir}', flush=True)

  # --- Resume: the latest complete checkpoint, and the metric lines up to
  # its step (later ones were written after it and will be written again).
  checkpoints = checkpoints_lib.Checkpoints(workdir, keep=checkpoint_keep)
  start = 0
  if resume:
    state, start = checkpoints.restore_latest(state)
    kept = writers.truncate_metrics(workdir, start)
    if start:
      print(f'  resumed from the checkpoint of step {start} '
            f'({kept} metric lines kept)', flush=True)
    else:
      print(f'  no complete checkpoint in {workdir}: starting from step 0',
            flush=True)
    if start >= num_steps:
      checkpoints.close()
      print(f'  the run was already complete ({num_steps} steps)',
            flush=True)
      lines = [l for l in writers.read_metrics(workdir) if 'eval/loss' in l]
      return {k: float(v) for k, v in lines[-1].items()
              if k.startswith('eval/')} if lines else {}

  key_order = ['train/loss', 'train/aux_loss', 'train/accuracy',
               'train/learning_rate', 'probe/loss', 'probe/eval_mode_loss',
               'probe/bn_train_eval_gap', 'eval/loss', 'eval/accuracy',
               'nonfinite/first_step', 'nonfinite/first_activation',
               'nonfinite/first_grad_layer',
               'grad_norm/global'] + [
                   f'{stat}/{n}' for stat in metrics_lib.LAYER_STATS
                   for n in layer_names] + [
                   f'{stat}/{n}' for stat in metrics_lib.ACTIVATION_STATS
                   for n, _ in sites] + [
                   f'{stat}/{n}' for stat in metrics_lib.BN_STATS
                   for n in layer_names]
  writer = writers.MetricsWriter(workdir, key_order)

  # --- Compile the steps. ---
  names = dict(layer_names=tuple(layer_names), activation_sites=sites)

  def jit_train_step(with_stats: bool):
    step_fn = functools.partial(
        train_step, **names, bn_layers=bn_layers, schedule=schedule,
        aux_loss_weight=aux_loss_weight, layer_stats=with_stats,
        skip_nonfinite=on_nonfinite == 'skip')
    step_fn.__name__ = 'train_step_with_stats' if with_stats else 'train_step'
    return jax.jit(step_fn, donate_argnums=(0,))

  p_histogram_step = jax.jit(functools.partial(
      histogram_step, **names, aux_loss_weight=aux_loss_weight))
  p_probe_step = jax.jit(probe_step)
  p_eval_step = jax.jit(eval_step)

  # --- Train. ---
  batches = data_lib.prefetch(
      datasets.train.train_batches(batch_size, config.seed,
                                   start_step=start),
      size=3, transform=jax.device_put)
  log_every = config.log_every_steps or num_steps
  eval_every = config.eval_every_steps or num_steps
  histogram_every = config.get('histogram_every_steps', 0)
  checkpoint_every = config.get('checkpoint_every_steps', 0) or num_steps
  nonfinite_reported = any('nonfinite/first_step' in l
                           for l in writers.read_metrics(workdir))
  eval_result = {}
  logged = lambda step: step % log_every == 0 or step == num_steps
  # Per-layer statistics are written on logged steps only. In a long run
  # the steps in between run a second version of the step without them
  # (it updates the state alike); see MIN_UNLOGGED_STEPS. Both compile
  # here with the probe, so that the first logged rate is the steps' own.
  t_begin = time.perf_counter()
  batch = next(batches)
  jax.block_until_ready(p_probe_step(state, probe_batch))
  # Counted over the whole run, not from `start`: a resumed run takes the
  # same version at every step as the uninterrupted one, so it stays exact.
  unlogged = sum(not logged(step) for step in range(1, num_steps + 1))
  split = layer_stats and unlogged >= MIN_UNLOGGED_STEPS
  with_stats = lambda step: layer_stats and (logged(step) or not split)
  compiled = {v: jit_train_step(v).lower(state, batch, dropout_key).compile()
              for v in ({True, False} if split else {layer_stats})}
  which = ' (with and without statistics)' if split else ''
  print(f'  compiled the train step{which} and the probe in '
        f'{time.perf_counter() - t_begin:.1f}s', flush=True)
  for step in range(start + 1, num_steps + 1):
    if step > start + 1:
      batch = next(batches)
    if histogram_every and (step % histogram_every == 0 or step == 1):
      # Before the step, on its batch: the gradients it is about to apply.
      writer.write_histograms(step, jax.device_get(
          p_histogram_step(state, batch, dropout_key)))
    state, scalars = compiled[with_stats(step)](state, batch, dropout_key)
    if step == start + 1:  # Rates from here: step 1 compiled histograms.
      jax.block_until_ready(state)
      t_last, step_last = time.perf_counter(), step
    first_bad = None
    if logged(step):
      scalars = jax.device_get({**scalars, **p_probe_step(state, probe_batch)})
      first_bad = jax.device_get(state.first_nonfinite)
      if first_bad[0] >= 0 and not nonfinite_reported:
        nonfinite_reported = True
        scalars.update(_nonfinite_report(first_bad, layer_names, sites))
      line = writer.write(step, scalars)
      _halt_if_diverged(first_bad, on_nonfinite, layer_names, sites,
                        checkpoints, writer)
      now = time.perf_counter()
      rate = ((step - step_last) / max(now - t_last, 1e-9)
              if step > step_last else 0)
      t_last, step_last = now, step
      eta = (num_steps - step) / rate if rate else 0
      print(f'  step {step:>{len(str(num_steps))}}/{num_steps}  '
            f'loss {_fmt(line["train/loss"])}  '
            f'acc {_fmt(line["train/accuracy"], 3)}'
            f'  probe loss {_fmt(line["probe/loss"])}'
            f'  | {rate:.2f} steps/s {rate * batch_size:.0f} img/s  '
            f'eta {_format_duration(eta)}', flush=True)
    if step % eval_every == 0 or step == num_steps:
      eval_result = evaluate(p_eval_step, state, datasets.test,
                             config.eval_batch_size,
                             config.get('eval_num_examples'))
      writer.write(step, eval_result)
      print(f'  eval at step {step}: loss {eval_result["eval/loss"]:.4f}  '
            f'accuracy {eval_result["eval/accuracy"]:.4f}', flush=True)
    if step % checkpoint_every == 0 or step == num_steps:
      # Never save a diverged state: halt first, keeping the last good one.
      first_bad = jax.device_get(state.first_nonfinite)
      _halt_if_diverged(first_bad, on_nonfinite, layer_names, sites,
                        checkpoints, writer)
      writer.flush()  # Every line of this step is on disk before it.
      checkpoints.save(state)
  writer.close()
  checkpoints.close()

  # --- Plots, from the files just written. ---
  plot_paths = plots.plot_run(workdir)
  print(f'done in {_format_duration(time.perf_counter() - t_begin)}: '
        f'metrics {workdir / "metrics.jsonl"}, {len(plot_paths)} plots in '
        f'{workdir / "plots"}', flush=True)
  return {k: float(v) for k, v in eval_result.items()}


def _layer_kind(name: str, params) -> str:
  leaves = metrics_lib.layer_params(params, name)
  if 'kernel' in leaves:
    return 'conv' if leaves['kernel'].ndim == 4 else 'dense'
  if 'scale' in leaves:
    return 'norm'
  return 'other'

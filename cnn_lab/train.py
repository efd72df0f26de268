"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The only code that reads the root config. Below it, sub-configs go in as
keyword arguments (`make_datasets(**config.data)`, `create_model(...)`,
`make_optimizer(**config.optim)`). Everything that can reject the config
(model knobs, optimiser, data) runs before the workdir is created, so a bad
config leaves nothing behind.
"""

import datetime
import functools
import math
import pathlib
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
from flax.training import train_state

from cnn_lab import data as data_lib
from cnn_lab import metrics as metrics_lib
from cnn_lab import models, optim, plots, writers
from cnn_lab.errors import ConfigError, check_positive


class TrainState(train_state.TrainState):
  """Parameters, optimiser state and step, plus batch-norm statistics
  (an empty dict for models without batch norm: one code path for all)."""
  batch_stats: Any = flax.core.FrozenDict()


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
      batch_stats=variables.get('batch_stats', {}))


def _variables(state: TrainState, params) -> dict:
  if state.batch_stats:
    return {'params': params, 'batch_stats': state.batch_stats}
  return {'params': params}


def train_step(state: TrainState, batch, dropout_key, *, layer_names,
               schedule, aux_loss_weight: float = 0.3):
  """One SGD step; returns the new state and a flat dict of scalar metrics.

  Models with auxiliary classifiers (GoogLeNet's `aux_heads`) sow their
  logits into the 'aux_logits' collection in training; their cross-entropy,
  times `aux_loss_weight`, is added to the objective and logged as
  `train/aux_loss`, while `train/loss` stays the main classifier's loss so
  that runs with and without auxiliary heads compare directly.
  """
  # A fresh dropout mask every step, derived from the step number so that a
  # resumed run draws the same masks as an uninterrupted one.
  key = jax.random.fold_in(dropout_key, state.step)
  mutable = ['aux_logits'] + (['batch_stats'] if state.batch_stats else [])

  def loss_fn(params):
    out = state.apply_fn(_variables(state, params), batch['image'],
                         train=True, rngs={'dropout': key}, mutable=mutable)
    logits, new_vars = out
    loss = metrics_lib.cross_entropy(logits, batch['label']).mean()
    aux_logits = jax.tree.leaves(new_vars.get('aux_logits', {}))
    if not aux_logits:
      return loss, (loss, None, logits, new_vars)
    aux_loss = aux_loss_weight * sum(
        metrics_lib.cross_entropy(a, batch['label']).mean()
        for a in aux_logits)
    return loss + aux_loss, (loss, aux_loss, logits, new_vars)

  (_, (loss, aux_loss, logits, new_vars)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(
      grads=grads, batch_stats=new_vars.get('batch_stats', state.batch_stats))
  scalars = {
      'train/loss': loss,
      'train/accuracy': metrics_lib.accuracy(logits, batch['label']).mean(),
      'train/learning_rate': schedule(state.step),
      **metrics_lib.compute_grad_stats(grads, layer_names),
      **metrics_lib.compute_layer_stats(grads, state.params,
                                        new_state.params, layer_names),
  }
  if aux_loss is not None:  # The model has auxiliary heads.
    scalars['train/aux_loss'] = aux_loss
  return new_state, scalars


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


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path | None) -> dict:
  """Trains `config` into `workdir`; returns the final evaluation metrics."""
  # --- Validate and build everything before touching the filesystem. ---
  for field in ('log_every_steps', 'eval_every_steps'):
    value = config.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ConfigError(f'{field}={value!r} is not allowed; it must be an '
                        'integer >= 0 (0: only at the end)')
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
  if (workdir / 'metrics.jsonl').exists():
    # Appending would mix two runs in one file.
    raise ConfigError(f'workdir {workdir} already holds a run; choose another '
                      '--workdir or delete it')
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
  layer_names = metrics_lib.layer_order(
      model, {'params': state.params, 'batch_stats': state.batch_stats},
      jnp.zeros((1, *datasets.image_shape), jnp.float32))

  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'plots').mkdir(exist_ok=True)
  resolved = config.to_dict()
  resolved['model']['num_classes'] = model_cfg['num_classes']
  writers.write_json_atomic(workdir / 'config.json', resolved)
  writers.write_json_atomic(workdir / 'layers.json', [
      {'name': name, 'kind': _layer_kind(name, state.params),
       'num_params': int(sum(x.size for x in jax.tree.leaves(
           metrics_lib.layer_params(state.params, name))))}
      for name in layer_names])
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'{config.name}: {model_cfg["name"]} with {num_params:,} parameters, '
        f'{datasets.name} {datasets.image_shape}, {num_steps} steps of '
        f'batch {batch_size}; workdir {workdir}', flush=True)

  key_order = ['train/loss', 'train/aux_loss', 'train/accuracy',
               'train/learning_rate',
               'eval/loss', 'eval/accuracy', 'grad_norm/global'] + [
                   f'{stat}/{n}' for stat in metrics_lib.LAYER_STATS
                   for n in layer_names]
  writer = writers.MetricsWriter(workdir, key_order)

  # --- Compile the steps. ---
  p_train_step = jax.jit(
      functools.partial(train_step, layer_names=tuple(layer_names),
                        schedule=schedule,
                        aux_loss_weight=aux_loss_weight),
      donate_argnums=(0,))
  p_eval_step = jax.jit(eval_step)

  # --- Train. ---
  batches = data_lib.prefetch(
      datasets.train.train_batches(batch_size, config.seed, start_step=0),
      size=3, transform=jax.device_put)
  log_every = config.log_every_steps or num_steps
  eval_every = config.eval_every_steps or num_steps
  eval_result = {}
  t_start = time.perf_counter()
  t_last, step_last = t_start, 0
  for step in range(1, num_steps + 1):
    state, scalars = p_train_step(state, next(batches), dropout_key)
    if step == 1:
      jax.block_until_ready(state)
      t_last, step_last = time.perf_counter(), 1
      print(f'  compiled and ran step 1 in {t_last - t_start:.1f}s',
            flush=True)
    if step % log_every == 0 or step == num_steps:
      line = writer.write(step, jax.device_get(scalars))
      now = time.perf_counter()
      rate = (step - step_last) / max(now - t_last, 1e-9) if step > 1 else 0
      t_last, step_last = now, step
      eta = (num_steps - step) / rate if rate else 0
      print(f'  step {step:>{len(str(num_steps))}}/{num_steps}  '
            f'loss {line["train/loss"]:.4f}  acc {line["train/accuracy"]:.3f}'
            f'  | {rate:.2f} steps/s {rate * batch_size:.0f} img/s  '
            f'eta {_format_duration(eta)}', flush=True)
    if step % eval_every == 0 or step == num_steps:
      eval_result = evaluate(p_eval_step, state, datasets.test,
                             config.eval_batch_size,
                             config.get('eval_num_examples'))
      writer.write(step, eval_result)
      print(f'  eval at step {step}: loss {eval_result["eval/loss"]:.4f}  '
            f'accuracy {eval_result["eval/accuracy"]:.4f}', flush=True)
  writer.close()

  # --- Plots, from the files just written. ---
  plot_path = plots.plot_gradient_flow(workdir)
  print(f'done in {_format_duration(time.perf_counter() - t_start)}: '
        f'metrics {workdir / "metrics.jsonl"}, plot {plot_path}', flush=True)
  return {k: float(v) for k, v in eval_result.items()}


def _layer_kind(name: str, params) -> str:
  leaves = metrics_lib.layer_params(params, name)
  if 'kernel' in leaves:
    return 'conv' if leaves['kernel'].ndim == 4 else 'dense'
  if 'scale' in leaves:
    return 'norm'
  return 'other'

"""The pure functions the training loop jits, and the state they carry.

`train_step` (one optimiser step and its statistics), `probe_step` (the
cost on a fixed batch without dropout), `eval_step` (sums over a test
batch) and `histogram_step` (whole per-layer tensors, for TensorBoard) take
a `TrainState` and a batch and return arrays only; `cnn_lab.train` decides
when each runs and moves their results to the host.
"""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.training import train_state

from cnn_lab import metrics as metrics_lib


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


def create_train_state(model, tx, image_shape, key) -> TrainState:
  # Non-partitionable threefry: the same keys on one device, and XLA
  # compiles the initialisation of a large network (GoogLeNet: ~130 arrays)
  # about 3x faster (measured 11s against 36s on 2 CPU cores).
  with jax.threefry_partitionable(False):
    variables = _jitted_init(model)(
        key, jnp.zeros((1, *image_shape), jnp.float32))
  return TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      batch_stats=variables.get('batch_stats', {}),
      first_nonfinite=jnp.full((3,), -1, jnp.int32),
      skipped_steps=jnp.zeros((), jnp.int32))


@functools.lru_cache(maxsize=16)
def _jitted_init(model):
  """`model.init`, jitted once for equal models: the seeds of a group
  (cnn_lab.seed_group) initialise one state each, and ResNet-20's
  initialisation took 2.6 s to compile every time."""
  return jax.jit(functools.partial(model.init, train=False))


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
    with metrics_lib.watch_activations():
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
               skip_nonfinite: bool = False, seed_axis: str | None = None):
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
  alike; `cnn_lab.train` runs the one with statistics on logged steps.

  `seed_axis`: the axis name of a `jax.vmap` of this step over the seeds
  of a group (`cnn_lab.seed_group`). Under vmap a `lax.cond` on a
  per-seed predicate becomes a select that computes both branches at every
  step (in the step without statistics, a second forward pass); with the
  axis named, the search for where non-finite values started runs, for
  every seed, only at steps where some seed needs it.
  """
  # A fresh dropout mask every step, derived from the step number so that a
  # resumed run draws the same masks as an uninterrupted one.
  key = jax.random.fold_in(dropout_key, state.step)
  collections = [metrics_lib.STATS_COLLECTION] if layer_stats else []
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
        new_vars.get(metrics_lib.STATS_COLLECTION, {}), activation_sites))
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

  finite = ok
  if seed_axis is not None:  # One predicate for the whole group.
    finite = jax.lax.psum((~ok).astype(jnp.int32), seed_axis) == 0
  origin = jax.lax.cond(finite, lambda: jnp.full((2,), -1, jnp.int32),
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
  mutable = [metrics_lib.STATS_COLLECTION] + (
      ['batch_stats'] if state.batch_stats else [])
  with metrics_lib.watch_activations():
    _, new_vars = state.apply_fn(
        _variables(state, state.params), batch['image'], train=True,
        rngs={'dropout': key}, mutable=mutable)
  stats = metrics_lib.collect_activation_stats(
      new_vars[metrics_lib.STATS_COLLECTION], sites)
  return [stats[f'act_mean/{name}'] for name, _ in sites]


def histogram_step(state: TrainState, batch, dropout_key, *, layer_names,
                   activation_sites, aux_loss_weight: float = 0.3):
  """The gradient of each layer (its arrays flattened into one vector) and
  each activation site's output, for the step `train_step` is about to take
  on the same batch (same dropout mask). Called only every
  `histogram_every_steps`, so the train step itself never returns tensors."""
  key = jax.random.fold_in(dropout_key, state.step)
  *_, new_vars, grads = _loss_and_grads(
      state, batch, key, aux_loss_weight, [metrics_lib.VALUES_COLLECTION])
  out = {}
  for name in layer_names:
    out[f'grads/{name}'] = jnp.concatenate([
        x.ravel() for x in jax.tree.leaves(
            metrics_lib.layer_params(grads, name))])
  acts = new_vars[metrics_lib.VALUES_COLLECTION]
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
  logits = train_mode_logits(state, batch['image'])
  loss = metrics_lib.cross_entropy(logits, batch['label']).mean()
  out = {'probe/loss': loss}
  if state.batch_stats:
    eval_logits = state.apply_fn(_variables(state, state.params),
                                 batch['image'], train=False)
    eval_loss = metrics_lib.cross_entropy(eval_logits, batch['label']).mean()
    out['probe/eval_mode_loss'] = eval_loss
    out['probe/bn_train_eval_gap'] = eval_loss - loss
  return out


def train_mode_logits(state: TrainState, images) -> jax.Array:
  """The logits of the training-mode forward pass with dropout off: batch
  norm normalises by the statistics of `images` themselves, and the moving
  averages it would update are thrown away (`state` is left as it is)."""

  def without_dropout(next_fun, args, kwargs, context):
    if (isinstance(context.module, nn.Dropout)
        and context.method_name == '__call__'):
      return args[0]  # The identity: keep probability 1.
    return next_fun(*args, **kwargs)

  variables = _variables(state, state.params)
  with nn.intercept_methods(without_dropout):
    if state.batch_stats:
      logits, _ = state.apply_fn(variables, images, train=True,
                                 mutable=['batch_stats'])
    else:
      logits = state.apply_fn(variables, images, train=True)
  return logits


def eval_step(state: TrainState, batch):
  """Sums of loss and correct predictions over the unmasked examples."""
  logits = state.apply_fn(_variables(state, state.params), batch['image'],
                          train=False)
  return eval_sums(logits, batch)


def eval_sums(logits, batch) -> dict:
  """What `eval_step` returns for `logits` of `batch`: sums of loss and
  correct predictions over its unmasked examples, and their count."""
  mask = batch['mask']
  return {
      'loss_sum': jnp.sum(metrics_lib.cross_entropy(logits, batch['label'])
                          * mask),
      'correct_sum': jnp.sum(metrics_lib.accuracy(logits, batch['label'])
                             * mask),
      'count': jnp.sum(mask),
  }

"""Per-layer statistics, computed inside the jitted step.

A "layer" is a module that owns parameters directly (a convolution, a dense
layer, a batch norm), named by its module path joined with '/', e.g.
`block1_conv1`, `block1_bn1`, `fc1`. Layers are kept in forward order (input
to output), which is the order in which the forward pass calls them: JAX
sorts dict keys when it flattens a pytree, so the order cannot be read off
the parameter dict and is recorded once with a method interceptor.
"""

import contextlib
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnn_lab import layers


def _owners(params) -> dict[str, tuple[str, ...]]:
  """'/'-joined path -> path, for every module holding array leaves."""
  owners = {}

  def visit(tree, path):
    if any(not isinstance(v, dict) for v in tree.values()):
      owners['/'.join(path)] = path
    for k, v in tree.items():
      if isinstance(v, dict):
        visit(v, path + (k,))

  visit(params, ())
  return owners


def _forward_calls(model: nn.Module, variables, sample_input):
  """(path, module) of every module call of a training forward pass, in
  call order."""
  called = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      called.append(('/'.join(context.module.path), context.module))
    return next_fun(*args, **kwargs)

  # Training mode, so that layers used only in training (GoogLeNet's
  # auxiliary heads) take their place in the order.
  with nn.intercept_methods(record):
    jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=True,
                                 rngs={'dropout': jax.random.key(0)}),
        variables, sample_input)
  return called


def layer_order(model: nn.Module, variables, sample_input) -> list[str]:
  """Names of the parameterised layers of `model`, in forward order."""
  called = [path for path, _ in _forward_calls(model, variables,
                                                 sample_input)]
  owners = _owners(variables['params'])
  ordered = [name for name in dict.fromkeys(called) if name in owners]
  # Parameters used outside a module's __call__ (none in the zoo) go last.
  return ordered + sorted(set(owners) - set(ordered))


def batch_norm_layers(model: nn.Module, variables,
                      sample_input) -> list[tuple[str, float, float]]:
  """(name, momentum, epsilon) of every batch-norm layer, in forward order."""
  found = {}
  for path, module in _forward_calls(model, variables, sample_input):
    if isinstance(module, nn.BatchNorm):
      found.setdefault(path, (float(module.momentum),
                              float(module.epsilon)))
  return [(name, *settings) for name, settings in found.items()]


def activation_sites(model: nn.Module, variables,
                     sample_input) -> list[tuple[str, str]]:
  """(name, kind) of every `layers.Activation` of `model`, in forward order,
  e.g. ('block1_act1', 'relu')."""
  sites = {}
  for path, module in _forward_calls(model, variables, sample_input):
    if isinstance(module, layers.Activation):
      sites.setdefault(path, module.kind)
  return list(sites.items())


def layer_params(tree, name: str) -> dict:
  """The arrays that layer `name` owns directly (e.g. kernel and bias)."""
  for key in name.split('/') if name else ():
    tree = tree[key]
  return {k: v for k, v in tree.items() if not isinstance(v, dict)}


def layer_l2_norms(tree, names: Sequence[str]) -> dict[str, jax.Array]:
  """L2 norm over the direct parameters (e.g. kernel and bias) of each layer."""
  norms = {}
  for name in names:
    leaves = jax.tree.leaves(layer_params(tree, name))
    norms[name] = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                               for x in leaves))
  return norms


def global_l2_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def compute_grad_stats(grads, names: Sequence[str]) -> dict[str, jax.Array]:
  """`grad_norm/global` and one `grad_norm/<layer>` per layer."""
  stats = {'grad_norm/global': global_l2_norm(grads)}
  for name, value in layer_l2_norms(grads, names).items():
    stats[f'grad_norm/{name}'] = value
  return stats


# Per-layer keys of metrics.jsonl, in the order they are written.
LAYER_STATS = ('grad_norm', 'grad_mean_abs', 'grad_max_abs', 'param_norm',
               'update_ratio')


def _layer_leaves(tree, name: str) -> list[jax.Array]:
  return [x.astype(jnp.float32)
          for x in jax.tree.leaves(layer_params(tree, name))]


def compute_layer_stats(grads, params, new_params,
                        names: Sequence[str]) -> dict[str, jax.Array]:
  """Per-layer statistics of one step, over the arrays each layer owns
  (kernel and bias; a batch norm's scale and shift):

  - `grad_mean_abs/<layer>`: mean of |g| over all its entries;
  - `grad_max_abs/<layer>`: max of |g|;
  - `param_norm/<layer>`: L2 norm of the parameters before the step;
  - `update_ratio/<layer>`: ||new - old|| / ||old||, the optimiser's actual
    update (momentum, weight decay, clipping and schedule included) relative
    to the weights.
  """
  stats = {}
  for name in names:
    g = _layer_leaves(grads, name)
    old = _layer_leaves(params, name)
    new = _layer_leaves(new_params, name)
    size = sum(x.size for x in g)
    stats[f'grad_mean_abs/{name}'] = sum(jnp.sum(jnp.abs(x)) for x in g) / size
    stats[f'grad_max_abs/{name}'] = jnp.max(jnp.stack(
        [jnp.max(jnp.abs(x)) for x in g]))
    old_norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in old))
    step_norm = jnp.sqrt(sum(jnp.sum(jnp.square(b - a))
                             for a, b in zip(old, new)))
    stats[f'param_norm/{name}'] = old_norm
    # A layer whose weights are all zero has no meaningful ratio.
    stats[f'update_ratio/{name}'] = step_norm / jnp.maximum(old_norm, 1e-12)
  return stats


# An activation is saturated where its derivative has fallen below this
# fraction of the derivative's maximum: for tanh (y = tanh x, y' = 1 - y^2,
# at most 1) where y^2 > 0.9, |y| > 0.949, |x| > 1.82; for the sigmoid
# (y' = y(1 - y), at most 1/4) where (2y - 1)^2 > 0.9, i.e. y < 0.026 or
# y > 0.974, |x| > 3.64. The backward pass multiplies the gradient by y'
# there, so saturated units pass on less than a tenth of it.
SATURATION_DERIVATIVE_FRACTION = 0.1


def activation_stats(y: jax.Array, kind: str) -> dict[str, jax.Array]:
  """Statistics of one activation tensor `y` (N, ..., C) over the batch:

  - `mean`, `std`: over all its entries;
  - `saturated` (tanh and sigmoid): the fraction of entries in the saturated
    region (SATURATION_DERIVATIVE_FRACTION);
  - `dead` (ReLU): the fraction of units (channels: a convolution's filter
    over every position, or a dense layer's neuron) that are zero for every
    example of the batch, i.e. pass no gradient at all on it.
  """
  y = y.astype(jnp.float32)
  stats = {'mean': jnp.mean(y), 'std': jnp.std(y)}
  if kind in ('tanh', 'sigmoid'):
    s = y if kind == 'tanh' else 2 * y - 1  # Both: derivative ∝ 1 - s^2.
    stats['saturated'] = jnp.mean(
        (jnp.square(s) > 1 - SATURATION_DERIVATIVE_FRACTION).astype(
            jnp.float32))
  elif kind == 'relu':
    per_unit_max = jnp.max(y, axis=tuple(range(y.ndim - 1)))
    stats['dead'] = jnp.mean((per_unit_max <= 0).astype(jnp.float32))
  return stats


ACTIVATION_STATS = ('act_mean', 'act_std', 'act_saturated', 'act_dead')

# The variable collections `watch_activations` fills at every activation
# site when the caller of `model.apply` makes them mutable (cnn_lab.steps
# does; inference and `init` leave them alone, so watching costs nothing
# there).
STATS_COLLECTION = 'activation_stats'  # A few scalars per site.
VALUES_COLLECTION = 'activations'  # The whole tensor (histograms).


def _record_activation(next_fun, args, kwargs, context):
  """A flax method interceptor: the output of every `layers.Activation`
  call, reduced to `activation_stats` into STATS_COLLECTION and kept whole
  in VALUES_COLLECTION, for whichever of the two is mutable."""
  y = next_fun(*args, **kwargs)
  module = context.module
  if (not isinstance(module, layers.Activation)
      or context.method_name != '__call__' or module.is_initializing()):
    return y
  # Inside a jitted step these are reductions of a tensor it already
  # holds, taken where the tensor is made; stop_gradient keeps them out of
  # the backward pass.
  if module.is_mutable_collection(STATS_COLLECTION):
    for key, value in activation_stats(lax.stop_gradient(y),
                                       module.kind).items():
      module.put_variable(STATS_COLLECTION, key, value)
  if module.is_mutable_collection(VALUES_COLLECTION):
    module.put_variable(VALUES_COLLECTION, 'value', lax.stop_gradient(y))
  return y


@contextlib.contextmanager
def watch_activations() -> Iterator[None]:
  """Inside it, `model.apply(..., mutable=[STATS_COLLECTION])` records each
  activation site's `activation_stats` (and, with VALUES_COLLECTION, its
  whole output) under the site's module path."""
  with nn.intercept_methods(_record_activation):
    yield


def collect_activation_stats(collection, sites) -> dict[str, jax.Array]:
  """`act_<stat>/<site>` from the STATS_COLLECTION the model filled
  (`watch_activations`), for `sites` = [(name, kind), ...]."""
  stats = {}
  for name, _ in sites:
    tree = collection
    for key in name.split('/'):
      tree = tree[key]
    for stat, value in tree.items():
      stats[f'act_{stat}/{name}'] = value
  return stats


def bn_gap_stats(old_stats, new_stats,
                 bn_layers: Sequence[tuple[str, float, float]]
                 ) -> dict[str, jax.Array]:
  """How far each batch-norm layer's running statistics are from the
  current batch's, per channel c, averaged over channels:

  - `bn_mean_gap/<layer>`: |batch mean - running mean| / running std;
  - `bn_var_gap/<layer>`: |batch var - running var| / running var.

  The running values are those before the step (the ones evaluation would
  use). The batch values are recovered exactly from the moving-average
  update, new = m * old + (1 - m) * batch, with each layer's momentum m
  (`bn_layers`: (name, momentum, epsilon), from `batch_norm_layers`), so
  the step computes nothing over the activations for them; epsilon, the
  layer's own, keeps the ratios finite.
  """
  stats = {}
  for name, momentum, epsilon in bn_layers:
    old, new = layer_params(old_stats, name), layer_params(new_stats, name)
    run_mean, run_var = (old['mean'].astype(jnp.float32),
                         old['var'].astype(jnp.float32))
    batch_mean = (new['mean'] - momentum * run_mean) / (1 - momentum)
    batch_var = (new['var'] - momentum * run_var) / (1 - momentum)
    stats[f'bn_mean_gap/{name}'] = jnp.mean(
        jnp.abs(batch_mean - run_mean) / jnp.sqrt(run_var + epsilon))
    stats[f'bn_var_gap/{name}'] = jnp.mean(
        jnp.abs(batch_var - run_var) / (run_var + epsilon))
  return stats


BN_STATS = ('bn_mean_gap', 'bn_var_gap')


def first_true(flags: Sequence[jax.Array], *, last: bool = False
               ) -> jax.Array:
  """Index of the first (or, with `last`, the last) true entry of `flags`,
  or -1 when none is true."""
  if not flags:
    return jnp.int32(-1)
  flags = jnp.stack(flags)
  if last:
    flags = flags[::-1]
  index = jnp.argmax(flags)
  if last:
    index = len(flags) - 1 - index
  return jnp.where(jnp.any(flags), index, -1).astype(jnp.int32)


def nonfinite_origin(grads, layer_names: Sequence[str],
                     act_means: Sequence[jax.Array] = ()) -> jax.Array:
  """Where a step's non-finite values started: [grad layer, activation site]
  as indices in forward order, -1 where everything is finite.

  A NaN or inf in a gradient spreads backwards to every layer below it, so
  the layer where it started is the first one the backward pass computes,
  the deepest (last in forward order) non-finite layer. An activation that
  is already non-finite in the forward pass spreads forwards, so there the
  first site in forward order is reported; then every gradient is non-finite
  and the layer index says little. A layer counts as non-finite when an
  entry of its gradient is NaN or inf (its max |g| is; an L2 norm could
  overflow on finite values).
  """
  grad_bad = [~jnp.isfinite(jnp.max(jnp.stack(
      [jnp.max(jnp.abs(x)) for x in _layer_leaves(grads, name)])))
              for name in layer_names]
  return jnp.stack([first_true(grad_bad, last=True),
                    first_true([~jnp.isfinite(m) for m in act_means])])


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels (float32)."""
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example 0/1 correctness."""
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)

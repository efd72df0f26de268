"""Per-layer statistics, computed inside the jitted step.

A "layer" is a module that owns parameters directly (a convolution, a dense
layer, a batch norm), named by its module path joined with '/', e.g.
`block1_conv1`, `block1_bn1`, `fc1`. Layers are kept in forward order (input
to output), which is the order in which the forward pass calls them: JAX
sorts dict keys when it flattens a pytree, so the order cannot be read off
the parameter dict and is recorded once with a method interceptor.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


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


def layer_order(model: nn.Module, variables, sample_input) -> list[str]:
  """Names of the parameterised layers of `model`, in forward order."""
  called = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      called.append('/'.join(context.module.path))
    return next_fun(*args, **kwargs)

  # Training mode, so that layers used only in training (GoogLeNet's
  # auxiliary heads) take their place in the order.
  with nn.intercept_methods(record):
    jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=True,
                                 rngs={'dropout': jax.random.key(0)}),
        variables, sample_input)
  owners = _owners(variables['params'])
  ordered = [name for name in dict.fromkeys(called) if name in owners]
  # Parameters used outside a module's __call__ (none in the zoo) go last.
  return ordered + sorted(set(owners) - set(ordered))


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


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels (float32)."""
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example 0/1 correctness."""
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)

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


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels (float32)."""
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example 0/1 correctness."""
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)

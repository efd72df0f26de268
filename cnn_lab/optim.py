"""Optimisers and learning-rate schedules: `make_optimizer(**config.optim)`.

Chain order: global-norm clipping of the raw gradient, then weight decay,
then the optimiser. For `sgd` and `adam`, weight decay is the classic L2
penalty added to the gradient (as in the VGG and ResNet papers); `adamw`
decays the weights directly (Loshchilov & Hutter). Decay applies to kernels
only (parameters with 2 or more dimensions), not to biases or batch-norm
scales and shifts.
"""

import math
from typing import Sequence

import jax
import optax

from cnn_lab.errors import ConfigError, check_choice, check_positive

OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'step')


def _kernel_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_schedule(*, learning_rate: float, schedule: str, num_steps: int,
                  warmup_steps: int = 0,
                  step_boundaries: Sequence[float] = (0.5, 0.75),
                  step_factor: float = 0.1) -> optax.Schedule:
  """`schedule` after a linear warm-up from 0 over `warmup_steps` steps.

  `step` multiplies the rate by `step_factor` at each boundary, given as a
  fraction of `num_steps`; `cosine` decays to 0 at `num_steps`.
  """
  check_positive('optim.learning_rate', learning_rate)
  check_choice('optim.schedule', schedule, SCHEDULES)
  if not isinstance(warmup_steps, int) or warmup_steps < 0:
    raise ConfigError(f'optim.warmup_steps={warmup_steps!r} is not allowed; '
                      'it must be an integer >= 0')
  decay_steps = max(num_steps - warmup_steps, 1)
  if schedule == 'constant':
    main = optax.constant_schedule(learning_rate)
  elif schedule == 'cosine':
    main = optax.cosine_decay_schedule(learning_rate, decay_steps)
  else:
    if any(not 0 < b < 1 for b in step_boundaries):
      raise ConfigError(f'optim.step_boundaries={tuple(step_boundaries)!r} '
                        'is not allowed; each must be a fraction in (0, 1)')
    main = optax.piecewise_constant_schedule(
        learning_rate,
        {int(b * decay_steps): step_factor for b in step_boundaries})
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def make_optimizer(*, name: str, learning_rate: float, num_steps: int,
                   schedule: str = 'constant', warmup_steps: int = 0,
                   step_boundaries: Sequence[float] = (0.5, 0.75),
                   step_factor: float = 0.1, momentum: float = 0.9,
                   nesterov: bool = False, b1: float = 0.9, b2: float = 0.999,
                   weight_decay: float = 0.0, grad_clip_norm: float = 0.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns the optax chain and its learning-rate schedule."""
  check_choice('optim.name', name, OPTIMIZERS)
  lr = make_schedule(learning_rate=learning_rate, schedule=schedule,
                     num_steps=num_steps, warmup_steps=warmup_steps,
                     step_boundaries=step_boundaries, step_factor=step_factor)
  for field, value in (('weight_decay', weight_decay),
                       ('grad_clip_norm', grad_clip_norm)):
    if (not isinstance(value, (int, float)) or not math.isfinite(value)
        or value < 0):
      raise ConfigError(f'optim.{field}={value!r} is not allowed; it must be '
                        'a finite number >= 0 (0 turns it off)')
  if not 0 <= momentum < 1:
    raise ConfigError(f'optim.momentum={momentum!r} is not allowed; it must '
                      'be in [0, 1)')

  parts = []
  if grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  if name == 'adamw':
    parts.append(optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay,
                             mask=_kernel_mask))
  else:
    if weight_decay > 0:
      parts.append(optax.add_decayed_weights(weight_decay, _kernel_mask))
    if name == 'sgd':
      parts.append(optax.sgd(lr, momentum=momentum or None,
                             nesterov=nesterov))
    else:
      parts.append(optax.adam(lr, b1=b1, b2=b2))
  return optax.chain(*parts), lr

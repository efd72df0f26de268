r"""Per-layer summary of a model: output shape, parameters and FLOPs.

  python -m cnn_lab.summary --model=googlenet --num_classes=1000 \
      --input_shape=224,224,3 [--knob=aux_heads=True ...]
  python -m cnn_lab.summary --config=configs/resnet20.py
  python -m cnn_lab.summary --model=googlenet --compare=googlenet_no_reduction
  python -m cnn_lab.summary --model=googlenet_paper --compare=googlenet_paper \
      --compare_knob=branch5=3x3x2     # two stacked 3x3 against one 5x5

One row per layer that owns parameters (convolution, dense, batch norm), in
forward order. FLOPs count 2 per multiply-accumulate of the convolutions and
dense layers for one example, the usual convention of FLOP counters; papers
often quote multiply-accumulates as "FLOPs" (ResNet-50's "3.8 x 10^9"), so
the totals give both. Biases, normalisation, activations and pooling are not
counted. Auxiliary heads (GoogLeNet) are included: they run in training.
With --compare, rows are grouped by top-level block (each inception module,
each residual block) and the two models are shown side by side.
The last line is `total_params: <N>` (with --compare: `total_params: <A>
<B>`). Exit status 2 with one line on stderr for a bad model, knob or shape.
"""

import ast
import dataclasses
import os
import sys
from typing import Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app, flags  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cnn_lab import metrics, models  # noqa: E402
from cnn_lab.errors import ConfigError  # noqa: E402


@dataclasses.dataclass
class Row:
  name: str
  output_shape: tuple[int, ...]  # Without the batch dimension.
  params: int
  macs: int  # Multiply-accumulates for one example.


def summarize(model: nn.Module, input_shape: Sequence[int]) -> list[Row]:
  """One Row per parameterised layer of `model`, in forward order, without
  allocating or computing anything (shapes only)."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  outputs = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and hasattr(out, 'shape'):
      outputs.setdefault('/'.join(context.module.path), out.shape)
    return out

  # Training mode, so that layers used only in training (auxiliary heads)
  # appear too.
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(
        v, x, train=True, mutable=True,
        rngs={'dropout': jax.random.key(0)}), variables, x)
  names = metrics.layer_order(model, variables, x)
  rows = []
  for name in names:
    own = metrics.layer_params(variables['params'], name)
    shape = tuple(outputs.get(name, ()))[1:]
    params = sum(int(np.prod(v.shape)) for v in own.values())
    macs = 0
    if 'kernel' in own:
      # A kernel's every weight is used once per output position.
      macs = int(np.prod(own['kernel'].shape)) * int(np.prod(shape[:-1]))
    rows.append(Row(name, shape, params, macs))
  return rows


def group_rows(rows: list[Row], depth: int = 1) -> list[Row]:
  """Sums rows by the first `depth` components of their names ('/'-split,
  then '_blockN' and '_convN' style suffixes kept): one row per block."""
  groups: dict[str, Row] = {}
  for row in rows:
    key = '/'.join(row.name.split('/')[:depth])
    if key not in groups:
      groups[key] = Row(key, row.output_shape, 0, 0)
    g = groups[key]
    g.params += row.params
    g.macs += row.macs
    g.output_shape = row.output_shape  # The block's last layer's output.
  return list(groups.values())


def _shape(shape) -> str:
  return 'x'.join(map(str, shape)) if shape else '-'


def _si(n: float) -> str:
  for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(n) >= scale:
      return f'{n / scale:.2f}{unit}'
  return f'{n:.0f}'


def format_table(rows: list[Row], title: str) -> str:
  width = max([len(r.name) for r in rows] + [5])
  lines = [title,
           f'{"layer":<{width}}  {"output":>14}  {"params":>12}  '
           f'{"FLOPs":>10}',
           '-' * (width + 44)]
  for r in rows:
    lines.append(f'{r.name:<{width}}  {_shape(r.output_shape):>14}  '
                 f'{r.params:>12,}  {_si(2 * r.macs):>10}')
  total_params = sum(r.params for r in rows)
  total_macs = sum(r.macs for r in rows)
  lines += ['-' * (width + 44),
            f'{"total":<{width}}  {"":>14}  {total_params:>12,}  '
            f'{_si(2 * total_macs):>10}',
            f'FLOPs per example: {2 * total_macs:,} '
            f'(multiply-accumulates: {total_macs:,})',
            f'total_params: {total_params}']
  return '\n'.join(lines)


def format_comparison(a: list[Row], b: list[Row], title_a: str,
                      title_b: str) -> str:
  ga, gb = {r.name: r for r in group_rows(a)}, {r.name: r for r in
                                                 group_rows(b)}
  names = list(ga) + [n for n in gb if n not in ga]
  width = max([len(n) for n in names] + [5])
  head = (f'{"block":<{width}}  {"params A":>12} {"params B":>12} '
          f'{"B/A":>6}  {"FLOPs A":>9} {"FLOPs B":>9} {"B/A":>6}')
  lines = [f'A: {title_a}', f'B: {title_b}', head, '-' * len(head)]

  def ratio(x, y):
    return f'{y / x:.2f}' if x else '-'

  for n in names:
    ra, rb = ga.get(n, Row(n, (), 0, 0)), gb.get(n, Row(n, (), 0, 0))
    lines.append(f'{n:<{width}}  {ra.params:>12,} {rb.params:>12,} '
                 f'{ratio(ra.params, rb.params):>6}  {_si(2 * ra.macs):>9} '
                 f'{_si(2 * rb.macs):>9} {ratio(ra.macs, rb.macs):>6}')
  pa, pb = sum(r.params for r in a), sum(r.params for r in b)
  ma, mb = sum(r.macs for r in a), sum(r.macs for r in b)
  lines += ['-' * len(head),
            f'{"total":<{width}}  {pa:>12,} {pb:>12,} {ratio(pa, pb):>6}  '
            f'{_si(2 * ma):>9} {_si(2 * mb):>9} {ratio(ma, mb):>6}',
            f'total_params: {pa} {pb}']
  return '\n'.join(lines)


# --- Command line. ---

_MODEL = flags.DEFINE_string('model', None, 'Model name (cnn_lab.models).')
_CONFIG = flags.DEFINE_string('config', None, 'A config file: summarise its '
                              'model at its data.image_size.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'Classes (default '
                                    '1000 for --model; the dataset\'s for '
                                    '--config).')
_INPUT_SHAPE = flags.DEFINE_string('input_shape', None, 'H,W,C (default '
                                   '224,224,3 for --model).')
_KNOB = flags.DEFINE_multi_string('knob', [], 'knob=value for --model.')
_COMPARE = flags.DEFINE_string('compare', None, 'A second model name or '
                               'config file to show side by side.')
_COMPARE_KNOB = flags.DEFINE_multi_string('compare_knob', [], 'knob=value '
                                          'for the --compare model.')


def _parse_knobs(items: Sequence[str], flag: str) -> dict:
  knobs = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise ConfigError(f'--{flag}={item!r} is not allowed; write '
                        'knob=value, e.g. --knob=norm=batch')
    if key in ('name', 'num_classes'):
      raise ConfigError(f'--{flag}={item!r} is not allowed; give the model '
                        'as --model (or --compare) and the classes as '
                        '--num_classes')
    try:
      knobs[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      knobs[key] = value  # A bare word such as relu.
    except (TypeError, MemoryError, RecursionError):
      raise ConfigError(f'--{flag}={item!r}: cannot read the value '
                        f'{value!r}') from None
  return knobs


def _parse_shape(text: str) -> tuple[int, int, int]:
  try:
    shape = tuple(int(p) for p in text.split(','))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) <= 0:
    raise ConfigError(f'--input_shape={text!r} is not allowed; write H,W,C '
                      'with three positive integers, e.g. 32,32,3')
  return shape


def _from_config(path: str, knobs: dict):
  """(model, input shape, title) of a config file's model."""
  from cnn_lab.data import sources
  import importlib.util
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path} does not exist')
  spec = importlib.util.spec_from_file_location('_summary_config', path)
  module = importlib.util.module_from_spec(spec)
  # Configs import their base as `configs.<name>`: the folder above
  # configs/ must be importable wherever this runs from.
  sys.path[:0] = [os.getcwd(), os.path.dirname(os.path.dirname(
      os.path.abspath(path)))]
  try:
    spec.loader.exec_module(module)
    config = module.get_config()
    model_cfg = {k: v for k, v in config.model.to_dict().items()
                 if v is not None}
    data = config.data
    data.dataset, data.image_size  # Both needed below.
  except Exception as e:  # A broken config file: one line, not a traceback.
    raise ConfigError(f'config file {path} cannot be loaded: '
                      f'{type(e).__name__}: {e}') from None
  if 'name' not in model_cfg:
    raise ConfigError(f'config file {path} sets no model.name; it is not an '
                      'experiment config')
  if data.dataset == 'synthetic':
    classes = data.get('synthetic_classes', 10)
    channels = tuple(data.get('synthetic_shape', (32, 32, 3)))[-1]
  else:
    classes, channels = sources.describe_tfds(data.dataset,
                                              data.get('data_dir'))
  model_cfg.setdefault('num_classes', classes)
  if _NUM_CLASSES.value is not None:
    model_cfg['num_classes'] = _NUM_CLASSES.value
  model_cfg.update(knobs)
  shape = (data.image_size, data.image_size, channels)
  if _INPUT_SHAPE.value:
    shape = _parse_shape(_INPUT_SHAPE.value)
  return models.create_model(**model_cfg), shape, f'{path} ({model_cfg["name"]})'


def _from_name(name: str, knobs: dict):
  shape = _parse_shape(_INPUT_SHAPE.value or '224,224,3')
  classes = 1000 if _NUM_CLASSES.value is None else _NUM_CLASSES.value
  model = models.create_model(name=name, num_classes=classes, **knobs)
  extra = ''.join(f', {k}={v!r}' for k, v in knobs.items())
  return model, shape, f'{name}{extra} at {_shape(shape)}, {classes} classes'


def _build(spec: str, knobs: dict):
  if spec.endswith('.py'):
    return _from_config(spec, knobs)
  return _from_name(spec, knobs)


def main(argv):
  if len(argv) > 1:
    raise ConfigError(f'unexpected argument {argv[1]!r}')
  if bool(_MODEL.value) == bool(_CONFIG.value):
    raise ConfigError('give exactly one of --model=NAME or '
                      '--config=configs/NAME.py')
  model, shape, title = _build(_MODEL.value or _CONFIG.value,
                               _parse_knobs(_KNOB.value, 'knob'))
  rows = summarize(model, shape)
  if not _COMPARE.value:
    print(format_table(rows, title))
    return
  other, other_shape, other_title = _build(
      _COMPARE.value, _parse_knobs(_COMPARE_KNOB.value, 'compare_knob'))
  print(format_comparison(rows, summarize(other, other_shape), title,
                          other_title))


def run(argv=None):
  argv = sys.argv if argv is None else argv
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  try:
    main(flags.FLAGS(argv, known_only=True))
  except ConfigError as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  run()

r"""Trains one config:

  python launch.py --config=configs/vgg16_nobn.py [--workdir=DIR] \
      [--config.train.num_steps=200 --config.model.dropout_rate=0.3 ...]

Any config field can be overridden with --config.<field>=<value>. Without
--workdir a new folder under runs/ is used (printed at the start).
Exit status: 0 done; 2 invalid config, flag or input (one line on stderr).
"""

import os
import sys

if __name__ == '__main__':
  # Before JAX starts: tcmalloc, or malloc on huge pages (cnn_lab/malloc.py).
  from cnn_lab.malloc import reexec_with_fast_malloc
  reexec_with_fast_malloc()

# Quiet TensorFlow's C++ start-up chatter (it is only used by TFDS/TensorBoard).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file defining get_config().',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Folder for metrics, plots and TensorBoard files '
    '(default: runs/<name>-<time>). A workdir holding a run of the same '
    'config resumes it from its latest checkpoint.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Delete the run in --workdir if it was made with '
    'another config (otherwise that is refused).')


def fail(message: str, status: int = 2) -> None:
  """One line on stderr, exit status 2: the contract for bad input (3: the
  run diverged under on_nonfinite=halt)."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(status)


def _config_path(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _unknown_field_message(argv, path: str) -> str | None:
  """Names the first --config.<field> override that the config lacks."""
  import importlib.util
  try:
    spec = importlib.util.spec_from_file_location('_cnn_lab_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception:  # The file itself is broken: reported elsewhere.
    return None
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    node, parts = config, arg[len('--config.'):].split('=', 1)[0].split('.')
    for i, part in enumerate(parts):
      if not hasattr(node, 'keys') or part not in node:
        where = '.'.join(parts[:i]) or 'the config'
        fields = ', '.join(node.keys()) if hasattr(node, 'keys') else ''
        return (f'unknown config field {".".join(parts)!r} in {arg.split("=")[0]}: '
                f'{where} has the fields {fields}')
      node = node[part]
  return None


def parse_flags(argv):
  """Parses flags and loads the config; every failure is one line, exit 2."""
  path = _config_path(argv)
  if path is None:
    fail('--config=configs/NAME.py is required')
  if not os.path.isfile(path):
    fail(f'config file {path} does not exist')
  try:
    flags.FLAGS(argv)
    _ = _CONFIG.value  # config_flags defers some load errors to here.
  except flags.Error as e:
    text = str(e)
    if 'Traceback' in text:  # get_config() raised: keep its last line.
      last = [l for l in text.splitlines() if l.strip()][-1].strip()
      fail(f'get_config() of {path} failed: {last}')
    fail(text)
  except (AttributeError, KeyError) as e:
    fail(_unknown_field_message(argv, path) or
         f'cannot load the config {path} ({type(e).__name__}: {e})')
  except Exception as e:  # Raised while loading the config file.
    cause = e.__cause__ or e
    fail(f'cannot load the config {path} ({type(cause).__name__}: {cause})')


def main(argv):
  parse_flags(argv)
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  from cnn_lab.errors import ConfigError
  from cnn_lab.train import Diverged, train_and_evaluate
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, _OVERWRITE.value)
  except ConfigError as e:
    fail(e)
  except Diverged as e:
    fail(e, status=3)
  except PermissionError as e:
    fail(f'cannot write the workdir: {e}')


if __name__ == '__main__':
  main(sys.argv)

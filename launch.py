r"""Trains one config:

  python launch.py --config=configs/vgg16_nobn.py [--workdir=DIR] \
      [--config.train.num_steps=200 --config.model.dropout_rate=0.3 ...]

Any config field can be overridden with --config.<field>=<value>. Without
--workdir a new folder under runs/ is used (printed at the start).
Exit status: 0 done; 2 invalid config, flag or input (one line on stderr).
"""

import os
import sys

# Quiet TensorFlow's C++ start-up chatter (it is only used by TFDS/TensorBoard).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file defining get_config().',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Folder for metrics, plots and TensorBoard files '
    '(default: runs/<name>-<time>).')


def fail(message: str) -> None:
  """One line on stderr, exit status 2: the contract for bad input."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    fail(e)
  except Exception as e:  # Raised while loading the config file.
    fail(f'cannot load the config ({type(e).__name__}: {e})')
  if _CONFIG.value is None:
    fail('--config=configs/NAME.py is required')


def main(argv):
  parse_flags(argv)
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  from cnn_lab.errors import ConfigError
  from cnn_lab.train import train_and_evaluate
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    fail(e)
  except PermissionError as e:
    fail(f'cannot write the workdir: {e}')


if __name__ == '__main__':
  main(sys.argv)

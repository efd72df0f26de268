"""Prepares TFDS's fashion_mnist offline from Debian's files (idempotent),
and loads it once, so that its arrays are kept for every later run
(`sources.load_tfds`).

  python -m cnn_lab.data.prepare [--data_dir=DIR]
"""

import argparse
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m cnn_lab.data.prepare')
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data dir (default: $TFDS_DATA_DIR or '
                      '~/tensorflow_datasets)')
  args = parser.parse_args(argv)
  import tensorflow_datasets as tfds
  from cnn_lab.data import sources
  tfds.disable_progress_bar()
  builder = sources.prepare_fashion_mnist(args.data_dir)
  splits = ', '.join(f'{k} {v.num_examples}'
                     for k, v in builder.info.splits.items())
  sources.load_tfds('fashion_mnist', args.data_dir)
  print(f'[setup] fashion_mnist ready in {builder.data_dir} ({splits})')
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""cnn_lab: ablation studies on the classic CNNs, layer by layer (JAX/Flax)."""

import os

# TensorFlow, which tensorflow-datasets loads on first use, logs to stderr
# when imported; the command-line tools promise one line on stderr for bad
# input. TF 2.21 prints its "oneDNN custom operations are on" notice
# whatever TF_CPP_MIN_LOG_LEVEL says; turning those operations off (they
# only affect TensorFlow's own ops, which cnn_lab uses to read files)
# silences it.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

# Before JAX starts its backend: Eigen's convolutions on the CPU
# (cnn_lab/xla_flags.py).
from cnn_lab.xla_flags import with_eigen_convolutions  # noqa: E402

os.environ['XLA_FLAGS'] = with_eigen_convolutions(
    os.environ.get('XLA_FLAGS', ''))

__version__ = '0.1.0'

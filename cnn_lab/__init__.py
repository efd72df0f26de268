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

__version__ = '0.1.0'

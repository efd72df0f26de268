"""How the layers' heavy ops are computed: the convolution's paths and their
selection, tiled max pooling, and batch norm's written-out gradient.

The layers (`cnn_lab.layers`) call three functions of this package and
nothing else of it: `conv2d`, `max_pool` and `batch_norm_train`.

Which convolution path runs where (`select.select_conv_paths`, whose
docstring has the measurements behind every rule), in order, the first
rule that matches:

  backend   layer                                 forward / dx / dw
  GPU, TPU  every layer                           XLA's (xla.py)
  CPU       float32, fewer than 128 channels on   oneDNN's, as XLA custom
            either side, oneDNN built (setup.sh)  calls (onednn.py, csrc/),
                                                  on several devices one
                                                  call per device's rows
  CPU       1x1 kernel, or an output map of at    im2col matmuls
            most 15 pixels                        (direct.py)
  CPU       3x3, stride 1, 'SAME', float32:
              >= 128 channels both sides          Winograd's (winograd.py)
              >= 32                               XLA's / XLA's / Winograd's
              fewer                               XLA's / XLA's / chunked
  CPU       other kernels of at most 9 taps       XLA's / XLA's / chunked
  CPU       larger kernels                        XLA's
  and in the last four rows, thin inputs: one input channel and at most 32
  output channels take the chunked forward pass, at most 8 input channels
  the shifted dx (direct.py).

Why: on the CPU, XLA runs thin convolutions, tiny maps and most kernel
gradients far below the matmul peak (its dw transposes x and dy first and
fuses the batch norm and ReLU before them into that transpose); each rule
above replaces XLA's path only where whole training steps ran faster.
Accelerators keep XLA's own convolutions: `impl='fast'` forces the CPU's
choice on any backend, for tests.

`max_pool` takes `pooling.tiled_max_pool` for windows of up to 5x5 that
tile the map (every backend); `batch_norm_train` (`batch_norm.py`, every backend) is
flax's training-mode batch norm with its backward pass written out.

`python -m cnn_lab.kernels` builds oneDNN's handlers (setup.sh runs it), or
says why they cannot be built here.
"""

from cnn_lab.kernels.batch_norm import batch_norm_train
from cnn_lab.kernels.pooling import max_pool
from cnn_lab.kernels.select import CONV_IMPLS, conv2d

__all__ = ['CONV_IMPLS', 'batch_norm_train', 'conv2d', 'max_pool']

"""`python -m cnn_lab.kernels`: builds oneDNN's convolution handlers where
they are missing (setup.sh runs it) and prints where they are; exit status
1, with the reason, where they cannot be built (the layers then keep XLA's
paths on the CPU)."""

import sys

from cnn_lab.kernels import onednn

sys.exit(onednn.main())

"""XLA's CPU convolutions: Eigen's, not YNNPACK's.

jax 0.10's XLA hands every convolution on the CPU to YNNPACK, which ran
many of the shapes of these models on one of this machine's two cores:
forward passes of 3x3 convolutions at batch 128 (2-core AMD EPYC, AVX-512,
float32) took, with YNNPACK against Eigen's convolution,

  16x16x32 -> 32    5.9 ms against 3.5 (102 against 174 GFLOP/s)
  8x8x64 -> 64      5.8 ms against 3.6
  32x32x64 -> 64    135 ms against 65 (71 against 147 GFLOP/s)
  16x16x128 -> 128  47 ms against 49 (both cores busy in both)

(pinned to one core, YNNPACK's times for the first three were unchanged).
Whole training steps with cnn_lab's convolution paths: ResNet-20 471 ->
418 ms, VGG16-BN at 32x32 1,936 -> 1,681 ms, LeNet-5 14.8 -> 13.4 ms.

XLA's debug flag `xla_cpu_experimental_ynn_fusion_type` takes convolutions
out of YNNPACK's fusions (matmuls and the rest stay there), and XLA reads
XLA_FLAGS once, when its first backend starts: `cnn_lab/__init__.py`
adds the flag to the environment on import, so it applies wherever
cnn_lab is imported before JAX first computes anything. Where XLA_FLAGS
already names `xla_cpu_experimental_ynn_fusion_type` it is left alone (to
keep YNNPACK's convolutions: XLA_FLAGS=
--xla_cpu_experimental_ynn_fusion_type=+individual_convolution). GPUs and
TPUs ignore the CPU's flags.
"""

FLAG_NAME = 'xla_cpu_experimental_ynn_fusion_type'
EIGEN_CONVOLUTIONS = f'--{FLAG_NAME}=-individual_convolution'


def with_eigen_convolutions(xla_flags: str) -> str:
  """XLA_FLAGS with EIGEN_CONVOLUTIONS added, unless they already set
  FLAG_NAME one way or the other."""
  if FLAG_NAME in xla_flags:
    return xla_flags
  return f'{xla_flags} {EIGEN_CONVOLUTIONS}'.strip()

"""oneDNN's CPU convolutions, as XLA custom calls (float32, NHWC, HWIO).

XLA's CPU backend runs thin convolutions (ResNet-20's 16-64 channels,
LeNet-5's 1-16) and most kernel gradients well below the matmul peak.
oneDNN, the library behind PyTorch's CPU convolutions, has kernels
generated for the machine's vector units. `csrc/onednn_conv.cc` wraps its
forward, input-gradient and kernel-gradient convolutions as XLA FFI
handlers: the path 'onednn' of `select.conv_paths`, which
`select.select_conv_paths` picks for float32 layers below 128 channels.

Threads. Each call splits its batch into one part per thread of XLA's
intra-op pool and runs the parts there, each a oneDNN primitive on one
thread (its OpenMP runtime starts no threads of its own). Run on oneDNN's
own two OpenMP threads, the convolutions competed with XLA's threads for
the two cores: inside ResNet-20's step a forward convolution took up to
twice as long as alone (16 -> 16 channels at 32x32: 9.4 against 4.8 ms;
the first layer 14 against 1.3), and the step took 464 against 452 ms
(medians of 9 alternating rounds, 2-core AMD EPYC with AVX2; LeNet-5 11.0
against 9.8). The kernel gradients of the parts are summed.

Several devices (`cnn_lab.distributed`: the batch split over a mesh of
CPU devices, in one process or several). XLA's SPMD partitioner cannot
split a custom call: it gathered the whole batch onto every device and ran
each call there in full. So where the process sees more than one device,
every call runs under `shard_map`, on each device's own rows of the batch,
and the kernel gradients of the devices are summed (`_on_each_device`):
the partitioned step has no all-gather, and the same values as on one
device up to the order of the sums (tests/test_devices.py). A batch that
does not divide among the devices (the one example of the model's
initialisation) keeps the single call.

The library comes from the pinned wheels onednn-cpu-iomp and
onednn-devel-cpu-iomp (oneDNN 3.2 on Intel's OpenMP runtime, from the wheel
intel-openmp; the libraries in <prefix>/lib, the headers in
<prefix>/include) and is compiled with the C++
compiler once, by `python -m cnn_lab.kernels` (setup.sh runs it) or on
first use, into <prefix>/lib/libcnn_lab_onednn-<hash of the source>.so.
Where that cannot be done, `available()` is False and the layers keep
their XLA paths; `python -m cnn_lab.kernels` says why.
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from cnn_lab import distributed
from cnn_lab.kernels.geometry import conv_geometry

SOURCE = pathlib.Path(__file__).with_name('csrc') / 'onednn_conv.cc'
TARGETS = {'fwd': 'OnednnConvFwd', 'dx': 'OnednnConvBwdData',
           'dw': 'OnednnConvBwdWeights'}

# Under `jax.vmap` (the seeds of a group, cnn_lab.seed_group), each call
# takes every operand with the vmapped axes in front (an unbatched one
# broadcast) and runs the stacked convolutions as one call, whose parts
# (one per seed when there are as many seeds as threads) XLA's threads
# share (csrc/onednn_conv.cc). LeNet-5's train step vmapped over 8 seeds,
# batch 128: 83.8 ms against 91.8 with 'sequential', a loop of single
# calls whose slices and updates of the stacked arrays cost more than the
# calls (medians of 7 alternating rounds in one process). Without a
# method, vmap fails. A normal run's program is unchanged (the same HLO):
# the method only says how vmap rewrites the call.
VMAP_METHOD = 'broadcast_all'


# Compiler flags after the source; '-Wl,--disable-new-dtags' makes the
# search path a DT_RPATH, which also finds libdnnl's own libiomp5.so.
FLAGS = ('-std=c++17', '-O2', '-shared', '-fPIC', '-w',
         '-Wl,--disable-new-dtags', '-Wl,-rpath,$ORIGIN')


def library_path() -> pathlib.Path:
  digest = hashlib.sha256(SOURCE.read_bytes() + repr(FLAGS).encode()
                          ).hexdigest()[:12]
  return pathlib.Path(sys.prefix) / 'lib' / f'libcnn_lab_onednn-{digest}.so'


def build() -> pathlib.Path:
  """Compiles the handlers against the installed oneDNN and JAX's FFI
  headers; raises RuntimeError with the reason where it cannot."""
  target = library_path()
  prefix = pathlib.Path(sys.prefix)
  lib_dir, include = prefix / 'lib', prefix / 'include'
  if not (include / 'oneapi' / 'dnnl' / 'dnnl.hpp').exists():
    raise RuntimeError(f'no oneDNN headers in {include} (pip install '
                       'onednn-devel-cpu-iomp==2023.2.0)')
  if not (lib_dir / 'libdnnl.so').exists():
    raise RuntimeError(f'no libdnnl.so in {lib_dir} (pip install '
                       'onednn-cpu-iomp==2023.2.0)')
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which(
      'c++')
  if not compiler:
    raise RuntimeError('no C++ compiler (apt-get install g++)')
  # Written under another name and renamed: processes building at the same
  # time never load a half-written library.
  with tempfile.NamedTemporaryFile(dir=lib_dir, suffix='.so',
                                   delete=False) as tmp:
    pass
  cmd = [compiler, str(SOURCE), *FLAGS, f'-I{include}',
         f'-I{jax.ffi.include_dir()}', f'-L{lib_dir}', '-ldnnl', '-liomp5',
         '-o', tmp.name]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  except OSError as e:
    os.unlink(tmp.name)
    raise RuntimeError(f'cannot run the C++ compiler {compiler}: {e}') from e
  if done.returncode != 0:
    os.unlink(tmp.name)
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{done.stderr.strip()}')
  os.chmod(tmp.name, 0o755)  # Loadable by every user of the prefix.
  os.replace(tmp.name, target)
  for old in lib_dir.glob('libcnn_lab_onednn-*.so'):  # Older sources'.
    if old != target:
      old.unlink(missing_ok=True)
  return target


@functools.cache
def _load() -> str | None:
  """Registers the handlers with XLA; None, or why it could not."""
  path = library_path()
  try:
    if not path.exists():
      build()
    lib = ctypes.CDLL(str(path))
  except (RuntimeError, OSError) as e:
    return str(e)
  for name in TARGETS.values():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                platform='cpu')
  return None


def available() -> bool:
  """Whether the 'onednn' path can run here (built on first call)."""
  return _load() is None


def _call(which: str, out_shape, a, b, strides, pads):
  reason = _load()
  if reason:
    raise RuntimeError(f'the oneDNN convolutions are not available: {reason}')
  (pt, pb), (pl, pr) = pads

  def call(shape, a, b):
    return jax.ffi.ffi_call(
        TARGETS[which], jax.ShapeDtypeStruct(tuple(shape), jnp.float32),
        vmap_method=VMAP_METHOD)(
            a, b, sh=np.int64(strides[0]), sw=np.int64(strides[1]),
            pt=np.int64(pt), pb=np.int64(pb), pl=np.int64(pl),
            pr=np.int64(pr))

  mesh = distributed.data_mesh()
  if mesh is None or a.shape[0] % mesh.size:
    return call(out_shape, a, b)
  return _on_each_device(mesh, which, call, out_shape, a, b)


def _on_each_device(mesh, which: str, call, out_shape, a, b):
  """The call on each device's rows of the batch, under `shard_map`.

  With several devices (`distributed.data_mesh`) XLA's SPMD partitioner
  cannot split a custom call: it gathers the whole batch onto every device
  and runs the call there in full (every device doing all the work). Each
  device runs it on its own rows instead, and the kernel gradients of the
  devices' rows are summed. A batch that does not divide among the devices
  (the one-example batch of the model's initialisation) keeps the single
  call."""
  rows = PartitionSpec(distributed.AXIS)
  if which == 'dw':  # x and dy split by rows, the kernel's gradient summed.
    fn = lambda a, b: jax.lax.psum(call(out_shape, a, b), distributed.AXIS)
    in_specs, out_specs = (rows, rows), PartitionSpec()
  else:  # x or dy split by rows, the kernel on every device.
    local = (out_shape[0] // mesh.size, *out_shape[1:])
    fn = lambda a, b: call(local, a, b)
    in_specs, out_specs = (rows, PartitionSpec()), rows
  # (check_vma off: ffi_call has no rule for the values' variance.)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                       out_specs=out_specs, check_vma=False)(a, b)


def conv(x, kernel, strides, pads):
  """The convolution (NHWC x, HWIO kernel, explicit `pads`)."""
  _, (out_h, out_w) = conv_geometry(x.shape[1:3], kernel.shape[:2], strides,
                                    pads)
  return _call('fwd', (x.shape[0], out_h, out_w, kernel.shape[3]), x,
               kernel, strides, pads)


def input_grad(dy, kernel, x_shape, strides, pads):
  """d(loss)/dx from dy = d(loss)/d(conv(x, kernel))."""
  return _call('dx', x_shape, dy, kernel, strides, pads)


def kernel_grad(x, dy, kernel_shape, strides, pads):
  """d(loss)/d(kernel) from x and dy."""
  return _call('dw', kernel_shape, x, dy, strides, pads)


def main() -> int:
  reason = _load()
  if reason:
    print(f'cnn_lab.kernels.onednn: not available: {reason}', file=sys.stderr)
    return 1
  print(f'cnn_lab.kernels.onednn: {library_path()}')
  return 0


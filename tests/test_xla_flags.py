"""Eigen's convolutions on the CPU (cnn_lab/xla_flags.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

from cnn_lab import xla_flags


@pytest.mark.parametrize('before,after', [
    ('', xla_flags.EIGEN_CONVOLUTIONS),
    ('--xla_dump_to=/tmp/d',
     f'--xla_dump_to=/tmp/d {xla_flags.EIGEN_CONVOLUTIONS}'),
    # The user's own choice, either way, stays as it is.
    ('--xla_cpu_experimental_ynn_fusion_type=+individual_convolution',
     '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution'),
    ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',
     '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'),
])
def test_adds_the_flag_once(before, after):
  assert xla_flags.with_eigen_convolutions(before) == after
  assert xla_flags.with_eigen_convolutions(after) == after


# Which library runs a convolution, read from XLA's compiled program.
PROBE = textwrap.dedent('''
    import cnn_lab
    import jax, jax.numpy as jnp
    from jax import lax
    conv = lambda x, w: lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    x, w = jnp.ones((128, 8, 8, 64)), jnp.ones((3, 3, 64, 64))
    text = jax.jit(conv).lower(x, w).compile().as_text()
    print('ynnpack' if '__ynn_fusion' in text else 'eigen')
''')


@pytest.mark.parametrize('user_flags,expected', [
    (None, 'eigen'),
    ('--xla_cpu_experimental_ynn_fusion_type=+individual_convolution',
     'ynnpack'),
])
def test_importing_cnn_lab_picks_the_convolutions(user_flags, expected):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  if user_flags:
    env['XLA_FLAGS'] = user_flags
  out = subprocess.run([sys.executable, '-c', PROBE], env=env, check=True,
                       capture_output=True, text=True).stdout
  assert out.split()[-1] == expected

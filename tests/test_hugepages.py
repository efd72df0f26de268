"""The re-run with malloc on huge pages (cnn_lab/hugepages.py)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from cnn_lab import hugepages

GLIBC = ('glibc', '2.36')
TUNED = f'{hugepages.TUNABLE}=1'


def test_adds_the_tunable_and_the_marker():
  env = hugepages.tuned_environ({'PATH': '/bin'}, GLIBC, 'madvise')
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': TUNED,
                 hugepages.MARKER: '1'}


def test_keeps_other_tunables():
  env = hugepages.tuned_environ(
      {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}, GLIBC, 'always')
  assert env['GLIBC_TUNABLES'] == f'glibc.malloc.arena_max=4:{TUNED}'


@pytest.mark.parametrize('environ,libc,thp', [
    ({'GLIBC_TUNABLES': f'{hugepages.TUNABLE}=0'}, GLIBC, 'madvise'),  # Opt-out.
    ({'GLIBC_TUNABLES': TUNED}, GLIBC, 'madvise'),   # Already on.
    ({hugepages.MARKER: '1'}, GLIBC, 'madvise'),     # Already re-run.
    ({}, ('glibc', '2.34'), 'madvise'),              # Before the tunable.
    ({}, ('glibc', '2.9'), 'madvise'),               # 9 < 35, not '9' > '3'.
    ({}, ('', ''), 'madvise'),                       # musl, or not found.
    ({}, ('glibc', 'unknown'), 'madvise'),
    ({}, GLIBC, 'never'),                            # THP off.
    ({}, GLIBC, None),                               # No THP setting.
])
def test_leaves_the_process_alone(environ, libc, thp):
  assert hugepages.tuned_environ(environ, libc, thp) is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  setting = tmp_path / 'enabled'
  setting.write_text('always [madvise] never\n')
  assert hugepages.thp_mode(str(setting)) == 'madvise'
  assert hugepages.thp_mode(str(tmp_path / 'missing')) is None


# Counts the page faults of touching a freshly malloc'ed 64 MiB block, after
# the re-run (16,384 pages of 4 KiB; 32 huge pages of 2 MiB).
FAULTS = textwrap.dedent('''
    import ctypes, os, resource, sys
    sys.path.insert(0, sys.argv[1])
    from cnn_lab.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 64 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(os.environ.get('GLIBC_TUNABLES'), after - before, sys.argv[2:])
''')


def run_faults(tmp_path, environ):
  script = tmp_path / 'faults.py'
  script.write_text(FAULTS)
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', hugepages.MARKER)}
  out = subprocess.run(
      [sys.executable, str(script), str(root), 'kept', '--flag=1'],
      env={**env, **environ}, capture_output=True, text=True, check=True)
  tunables, faults, argv = out.stdout.split(' ', 2)
  return tunables, int(faults), argv.strip()


@pytest.mark.skipif(
    hugepages.tuned_environ({}, hugepages.platform.libc_ver(),
                            hugepages.thp_mode()) is None,
    reason='glibc before 2.35, or transparent huge pages off')
def test_rerun_takes_huge_pages_and_keeps_the_arguments(tmp_path):
  tunables, faults, argv = run_faults(tmp_path, {})
  assert tunables == TUNED
  assert argv == "['kept', '--flag=1']"
  assert faults < 16384 // 4, faults
  # Opted out: no re-run, and in 'madvise' mode one fault per 4 KiB page.
  tunables, faults, _ = run_faults(
      tmp_path, {'GLIBC_TUNABLES': f'{hugepages.TUNABLE}=0'})
  assert tunables == f'{hugepages.TUNABLE}=0'
  if hugepages.thp_mode() == 'madvise':
    assert faults >= 16384 * 0.9, faults

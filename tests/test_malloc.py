"""The re-run on tcmalloc, or with malloc on huge pages (cnn_lab/malloc.py)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from cnn_lab import malloc

GLIBC = ('glibc', '2.36')
TC = 'libtcmalloc_minimal.so.4'
TUNED = f'{malloc.TUNABLE}=1'


def tuned(environ, libc=GLIBC, thp='madvise', tcmalloc=TC):
  return malloc.tuned_environ(environ, libc, thp, tcmalloc)


def test_preloads_tcmalloc_where_found():
  env = tuned({'PATH': '/bin'})
  assert env == {'PATH': '/bin', 'LD_PRELOAD': TC,
                 malloc.REPORT_THRESHOLD: str(1 << 40),
                 malloc.RELEASE_RATE: '0', malloc.MARKER: '1'}
  # Other preloads are kept, after it.
  assert tuned({'LD_PRELOAD': 'libfoo.so'})['LD_PRELOAD'] == f'{TC} libfoo.so'
  # Asked for by name, it overrides glibc's huge pages.
  env = tuned({malloc.CHOICE: 'tcmalloc', 'GLIBC_TUNABLES': TUNED})
  assert env['LD_PRELOAD'] == TC


def test_huge_pages_without_tcmalloc_or_when_asked():
  for environ, tcmalloc in (({}, None),
                            ({malloc.CHOICE: 'hugepages'}, TC)):
    env = tuned({'PATH': '/bin', **environ}, tcmalloc=tcmalloc)
    assert env == {'PATH': '/bin', **environ, 'GLIBC_TUNABLES': TUNED,
                   malloc.MARKER: '1'}
  env = tuned({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}, tcmalloc=None)
  assert env['GLIBC_TUNABLES'] == f'glibc.malloc.arena_max=4:{TUNED}'


@pytest.mark.parametrize('environ,libc,thp,tcmalloc', [
    ({'GLIBC_TUNABLES': f'{malloc.TUNABLE}=0'}, GLIBC, 'madvise', TC),
    ({'GLIBC_TUNABLES': TUNED}, GLIBC, 'madvise', None),  # Already on.
    ({'LD_PRELOAD': f'/x/{TC}'}, GLIBC, 'madvise', TC),    # Already on.
    ({'LD_PRELOAD': 'libjemalloc.so.2'}, GLIBC, 'madvise', TC),  # Chosen.
    ({malloc.MARKER: '1'}, GLIBC, 'madvise', TC),         # Already re-run.
    ({malloc.CHOICE: 'system'}, GLIBC, 'madvise', TC),    # Opted out.
    ({}, ('glibc', '2.34'), 'madvise', None),             # Before the tunable.
    ({}, ('glibc', '2.9'), 'madvise', None),      # 9 < 35, not '9' > '3'.
    ({}, ('', ''), 'madvise', None),              # musl, or not found.
    ({}, ('glibc', 'unknown'), 'madvise', None),
    ({}, GLIBC, 'never', None),
    ({}, GLIBC, None, None),                      # No THP setting.
])
def test_leaves_the_process_alone(environ, libc, thp, tcmalloc):
  assert tuned(environ, libc, thp, tcmalloc) is None


@pytest.mark.parametrize('environ,thp,tcmalloc,message', [
    ({malloc.CHOICE: 'jemalloc'}, 'madvise', TC,
     'expected one of auto, tcmalloc'),
    ({malloc.CHOICE: 'tcmalloc'}, 'madvise', None,
     'apt-get install libtcmalloc'),
    ({malloc.CHOICE: 'hugepages'}, 'never', TC,
     r'here: glibc 2\.36, never'),
])
def test_a_choice_that_cannot_be_made_is_an_error(environ, thp, tcmalloc,
                                                  message):
  with pytest.raises(malloc.MallocChoiceError, match=message):
    tuned(environ, thp=thp, tcmalloc=tcmalloc)


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  setting = tmp_path / 'enabled'
  setting.write_text('always [madvise] never\n')
  assert malloc.thp_mode(str(setting)) == 'madvise'
  assert malloc.thp_mode(str(tmp_path / 'missing')) is None


# After the re-run: the allocator in use, and the page faults of touching
# a freshly malloc'ed 64 MiB block (16,384 pages of 4 KiB; 32 huge pages of
# 2 MiB), then of freeing it and doing the same again, as XLA does with a
# step's scratch memory.
FAULTS = textwrap.dedent('''
    import ctypes, os, resource, sys
    sys.path.insert(0, sys.argv[1])
    from cnn_lab import malloc
    malloc.reexec_with_fast_malloc()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    faults = []
    for _ in range(2):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      block = libc.malloc(size)
      ctypes.memset(block, 1, size)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    - before)
      libc.free(block)
    print(malloc.describe(), *faults, sys.argv[2:], sep='|')
''')


def run_faults(tmp_path, environ):
  script = tmp_path / 'faults.py'
  script.write_text(FAULTS)
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {k: v for k, v in os.environ.items() if k not in (
      'GLIBC_TUNABLES', 'LD_PRELOAD', malloc.MARKER, malloc.CHOICE,
      malloc.RELEASE_RATE)}
  out = subprocess.run(
      [sys.executable, str(script), str(root), 'kept', '--flag=1'],
      env={**env, **environ}, capture_output=True, text=True, check=False)
  if out.returncode:
    return out.returncode, out.stderr.strip()
  allocator, first, second, argv = out.stdout.strip().split('|')
  return allocator, int(first), int(second), argv


@pytest.mark.skipif(not malloc.find_tcmalloc(),
                    reason='tcmalloc is not installed')
def test_rerun_on_tcmalloc_reuses_freed_memory(tmp_path):
  allocator, first, second, argv = run_faults(tmp_path, {})
  assert allocator == 'tcmalloc'
  assert argv == "['kept', '--flag=1']"
  if malloc.thp_mode() == 'madvise':
    assert first >= 16384 * 0.9, first  # Fresh memory, 4 KiB pages.
  assert second < 100, second  # The same memory again.
  # glibc without huge pages: the block is unmapped when freed and faulted
  # in again.
  allocator, first, second, _ = run_faults(
      tmp_path, {malloc.CHOICE: 'system'})
  assert allocator == 'glibc'
  if malloc.thp_mode() == 'madvise':
    assert min(first, second) >= 16384 * 0.9, (first, second)


@pytest.mark.skipif(
    tuned({malloc.CHOICE: 'hugepages'}, malloc.platform.libc_ver(),
          malloc.thp_mode()) is None,
    reason='glibc before 2.35, or transparent huge pages off')
def test_rerun_with_huge_pages(tmp_path):
  allocator, first, second, argv = run_faults(
      tmp_path, {malloc.CHOICE: 'hugepages'})
  assert allocator == 'glibc, huge pages'
  assert argv == "['kept', '--flag=1']"
  assert max(first, second) < 16384 // 4, (first, second)


def test_rerun_refuses_a_bad_choice_in_one_line(tmp_path):
  status, stderr = run_faults(tmp_path, {malloc.CHOICE: 'fast'})
  assert status == 2
  assert stderr == ("error: CNN_LAB_MALLOC='fast': expected one of auto, "
                    'tcmalloc, hugepages, system')

"""How cnn_lab's command-line entry points allocate memory (Linux).

XLA's CPU runtime allocates a step's scratch buffers with malloc and frees
them at the end of the step. glibc hands that memory back to the kernel
(blocks above its mmap threshold, and a thread arena's heap that has become
empty, are unmapped), so every step touches fresh pages, which the kernel
faults in and zeroes: 55,000 page faults of 4 KiB per ResNet-20 step at
batch 128, 167,000 per VGG16-BN step, about 1 us each.

- tcmalloc (gperftools' libtcmalloc_minimal; Debian's package
  libtcmalloc-minimal4, which setup.sh installs) keeps freed memory for the
  next step: no page faults at all, and the kernel's time in a ResNet-20
  step went from 50-150 ms to 2-5 ms. Whole steps, ratio to PyTorch in the
  same process (`bench --vs-torch`, which then runs PyTorch on tcmalloc
  too; three alternating runs each, 2-core AMD EPYC): 0.91-1.04 against
  0.84-0.86 with glibc's huge pages below. jemalloc set to keep its memory
  (and on huge pages) removed the faults too, but did less well: 0.85-1.00.
- Where tcmalloc is not installed: glibc's tunable `glibc.malloc.hugetlb=1`
  (glibc 2.35 and later) makes malloc ask for transparent huge pages, and
  the faults drop to about 430 per ResNet-20 step: its step took 402-420 ms
  against 460-534 ms without (three alternating pairs of processes).
  Confining glibc to one arena removes the faults too, but made the step
  1.5x slower.

Both take effect when a process starts, so `reexec_with_fast_malloc` runs
the command again, at once, with LD_PRELOAD (or the tunable) set. The
environment variable CNN_LAB_MALLOC chooses: 'auto' (the default: tcmalloc
where found, else huge pages), 'tcmalloc', 'hugepages', or 'system'
(neither). 'auto' does nothing where LD_PRELOAD already names an allocator
or GLIBC_TUNABLES already sets the tunable (to 0, say, to opt out of it).
"""

import ctypes.util
import os
import platform
import re
import sys
from typing import Mapping

CHOICE = 'CNN_LAB_MALLOC'
CHOICES = ('auto', 'tcmalloc', 'hugepages', 'system')
TCMALLOC = 'tcmalloc_minimal'
TUNABLE = 'glibc.malloc.hugetlb'
# Set in the re-run process: never re-run twice, even if the loader (in a
# setuid context, say) dropped the variables.
MARKER = 'CNN_LAB_MALLOC_SET'
THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'
# tcmalloc reports every allocation above this size on stderr (default
# 1 GiB, which ResNet-50's steps reach).
REPORT_THRESHOLD = 'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD'
RELEASE_RATE = 'TCMALLOC_RELEASE_RATE'


class MallocChoiceError(ValueError):
  """CNN_LAB_MALLOC names no choice, or one this machine cannot make."""


def thp_mode(path: str = THP_SETTING) -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise',
  'never'), or None where it cannot be read."""
  try:
    with open(path, encoding='ascii') as f:
      match = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return None
  return match.group(1) if match else None


def find_tcmalloc() -> str | None:
  """The soname of the installed tcmalloc (the loader finds it), or None."""
  return ctypes.util.find_library(TCMALLOC)


def _huge_pages_ok(libc: tuple[str, str], thp: str | None) -> bool:
  if thp not in ('always', 'madvise'):
    return False
  name, version = libc
  try:
    if name != 'glibc' or tuple(map(int, version.split('.')[:2])) < (2, 35):
      return False
  except ValueError:
    return False
  return True


def tuned_environ(environ: Mapping[str, str], libc: tuple[str, str],
                  thp: str | None, tcmalloc: str | None
                  ) -> dict[str, str] | None:
  """The environment to re-run the process in, or None to go on as is.

  libc: `platform.libc_ver()`, e.g. ('glibc', '2.36'); thp: `thp_mode()`;
  tcmalloc: `find_tcmalloc()`. Raises MallocChoiceError for a CNN_LAB_MALLOC
  that names no choice, or one this machine cannot make. 'auto' leaves
  alone an LD_PRELOAD that names an allocator (*malloc*) and a
  GLIBC_TUNABLES that sets the huge-page tunable (to 0, say).
  """
  choice = environ.get(CHOICE, 'auto')
  if choice not in CHOICES:
    raise MallocChoiceError(
        f'{CHOICE}={choice!r}: expected one of {", ".join(CHOICES)}')
  if MARKER in environ or choice == 'system':
    return None
  preload = environ.get('LD_PRELOAD', '')
  tunables = environ.get('GLIBC_TUNABLES', '')
  if choice == 'auto' and ('malloc' in preload or TUNABLE + '=' in tunables):
    return None  # The user chose an allocator, or glibc's huge pages.
  env = dict(environ)
  if choice == 'tcmalloc' or (choice == 'auto' and tcmalloc):
    if not tcmalloc:
      raise MallocChoiceError(
          f'{CHOICE}=tcmalloc, but lib{TCMALLOC} is not installed (Debian: '
          'apt-get install libtcmalloc-minimal4)')
    if 'tcmalloc' in preload:
      return None
    env['LD_PRELOAD'] = f'{tcmalloc} {preload}'.strip()
    env.setdefault(REPORT_THRESHOLD, str(1 << 40))
    # Keep freed memory for good (by default tcmalloc returns some of it
    # to the kernel, a little at a time).
    env.setdefault(RELEASE_RATE, '0')
  elif _huge_pages_ok(libc, thp):
    if TUNABLE + '=' in tunables:
      return None
    env['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}=1' if tunables else (
        f'{TUNABLE}=1')
  elif choice == 'hugepages':
    raise MallocChoiceError(
        f'{CHOICE}=hugepages needs glibc 2.35 or later and transparent huge '
        f'pages in madvise or always mode (here: {" ".join(libc)}, {thp})')
  else:
    return None
  env[MARKER] = '1'
  return env


def reexec_with_fast_malloc() -> None:
  """Re-runs this command with tcmalloc or malloc on huge pages, if it is
  not already (module docstring); returns only where nothing is to do.
  Call it first thing in a command-line entry point. A CNN_LAB_MALLOC that
  cannot be honoured ends the process with one line and status 2."""
  if sys.platform != 'linux':
    return
  try:
    env = tuned_environ(os.environ, platform.libc_ver(), thp_mode(),
                        find_tcmalloc())
  except MallocChoiceError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def describe() -> str:
  """The allocator this process runs on, for reports: 'tcmalloc',
  'glibc, huge pages' or 'glibc' (on Linux; 'system' elsewhere)."""
  try:
    with open('/proc/self/maps', encoding='ascii', errors='replace') as f:
      if 'libtcmalloc' in f.read():
        return 'tcmalloc'
  except OSError:
    return 'system'
  if TUNABLE + '=1' in os.environ.get('GLIBC_TUNABLES', ''):
    return 'glibc, huge pages'
  return 'glibc'

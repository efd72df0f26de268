import atexit
import os
import shutil
import tempfile

# Tests run on the CPU whatever the machine has, and quietly.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# XLA's LLVM backend at -O0: the same HLO programs, optimised alike by XLA,
# but machine code generated without LLVM's optimisations. Compiling is most
# of this suite's time, and -O0 cuts it by about a third (GoogLeNet's train
# step 10.5 -> 6.1 s, the whole suite 11:21 -> 9:05 on 2 cores); the tiny
# programs run slower, which costs little here. Users' runs keep XLA's
# default. (Float32 results can differ from -O2's in the last bits, as
# they do between machines: the tests compare with tolerances, or two runs
# under the same flags.)
_O0 = '--xla_backend_optimization_level=0'
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_O0}".strip()

# One persistent compilation cache per test session, shared by the xdist
# workers and by every launch.py the tests start (they inherit the
# environment): a program compiled once, in any of them, is loaded from
# disk the next time it is compiled. The suite's runs of launch.py and
# train_and_evaluate compile the same small steps many times over. The
# folder is new for each session (made by the first process, the one that
# starts the workers, and removed when it ends), so nothing carries over
# from one session to the next; `jax.log_compiles` still logs every
# compilation the program asks for, hit or not (tests/test_resume.py counts
# them).
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='cnn_lab-test-xla-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  # Programs that compile in well under a second are not worth a file.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
  # A size limit turns on JAX's file lock around every read and write of
  # the cache (package filelock): without it, a process could read an entry
  # another is still writing, and warn about it on stderr, where tests
  # count the lines.
  os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 * 2**30))


import pytest  # noqa: E402  (after the environment above)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Under xdist (`--dist loadgroup`, pyproject.toml), the tests of a module
  that request one of its module- or session-scoped fixtures (a real run,
  a prepared dataset) go to the same worker, so that the fixture is made
  once; the module's other tests, and every other test, go wherever a
  worker is free. Tests that share a `functools.cache` carry their own
  `xdist_group` marks. (Before xdist's own hook, which reads the marks.)"""
  del config
  for item in items:
    info = getattr(item, '_fixtureinfo', None)
    if info is None or item.get_closest_marker('xdist_group'):
      continue
    for name in item.fixturenames:
      defs = info.name2fixturedefs.get(name) or ()
      # baseid: '' for pytest's own fixtures (tmp_path_factory, ...).
      if any(d.baseid and d.scope in ('module', 'package', 'session')
             for d in defs):
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))
        break

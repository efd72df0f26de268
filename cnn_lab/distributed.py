"""Data-parallel training over every device, on one host or several.

A run sees every device of every process (`jax.devices()`), put in a 1-D
mesh with one axis, 'data' (`data_mesh`). Each global batch is split along
that axis, one contiguous block of rows per device; parameters, optimiser
state and batch-norm statistics are replicated. The steps themselves are
the single-device ones, jitted with replicated outputs (`jit`): XLA's SPMD
partitioner splits them, and turns every reduction over the batch (the mean
loss, hence the gradients; batch norm's mean and variance; the sums of
evaluation) into a sum over the whole global batch, so a step on D devices
computes what the step on one device computes, up to the order of float
additions (tests/test_devices.py). oneDNN's convolutions, which XLA cannot
split, run on each device's rows through `shard_map` (kernels/onednn.py).

With one device (the usual CPU run) nothing here changes the program:
`data_mesh` is None, `put_batch` is `jax.device_put`, `replicate` the
identity and `jit` plain `jax.jit`.

Several hosts. `initialize` joins the processes of a run through
`jax.distributed.initialize` before JAX computes anything; launch.py calls
it. Its settings, first found wins:

  coordinator address  --coordinator_address, JAX_COORDINATOR_ADDRESS
  process count        --num_processes, JAX_NUM_PROCESSES
  this process's id    --process_id, JAX_PROCESS_ID

When one of them is given all three must be; when none is, a task of a
job of several tasks started by SLURM's srun (SLURM_NTASKS) or Open MPI's
mpirun (OMPI_COMM_WORLD_SIZE) joins the others with the values JAX
detects there itself; otherwise the run is one process. On the CPU the processes' collectives run
over gloo (TCP). Every process loads the dataset and computes the same
global batch from the seed and the step (`cnn_lab.data.pipeline`), then
keeps its own block of rows (`put_batch`); only process 0 writes the run's
files and prints (`is_main`), while every process takes part in saving and
restoring checkpoints, as orbax requires.
"""

import functools
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn_lab.errors import ConfigError

AXIS = 'data'

ENV_VARS = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
            'num_processes': 'JAX_NUM_PROCESSES',
            'process_id': 'JAX_PROCESS_ID'}

# The jobs of cluster launchers that JAX's own `jax.distributed.initialize()`
# detects (jax/_src/clusters: the variables it needs), by the variable
# holding their task count: SLURM's srun, Open MPI's mpirun.
CLUSTER_TASK_COUNTS = {
    'SLURM_NTASKS': ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID',
                     'SLURM_LOCALID'),
    'OMPI_COMM_WORLD_SIZE': ('OMPI_MCA_orte_hnp_uri',)}


# --- joining the processes ---


def resolve_settings(coordinator_address: str | None = None,
                     num_processes: int | None = None,
                     process_id: int | None = None,
                     environ: Mapping[str, str] = os.environ) -> dict | None:
  """The arguments of `jax.distributed.initialize` for this process: the
  given values, else the environment's (module docstring); {} to let JAX
  detect a cluster job's; None for a run of one process. Raises
  ConfigError naming a missing or invalid value."""
  given = {'coordinator_address': coordinator_address,
           'num_processes': num_processes, 'process_id': process_id}
  for name, value in given.items():
    if value is None and environ.get(ENV_VARS[name], '') != '':
      given[name] = _from_env(ENV_VARS[name], environ[ENV_VARS[name]],
                              integer=name != 'coordinator_address')
  if all(v is None for v in given.values()):
    return {} if _cluster_tasks(environ) > 1 else None
  missing = [f'--{k} (or {ENV_VARS[k]})' for k, v in given.items()
             if v is None]
  if missing:
    raise ConfigError(f'a run of several processes needs all three of '
                      f'--coordinator_address, --num_processes and '
                      f'--process_id; missing: {", ".join(missing)}')
  _check_address(given['coordinator_address'])
  n, i = given['num_processes'], given['process_id']
  if not isinstance(n, int) or n < 1:
    raise ConfigError(f'num_processes={n!r} is not allowed; it must be an '
                      'integer >= 1')
  if not isinstance(i, int) or not 0 <= i < n:
    raise ConfigError(f'process_id={i!r} is not allowed with num_processes='
                      f'{n}; it must be an integer from 0 to {n - 1}')
  return given


def _from_env(var: str, text: str, integer: bool):
  if not integer:
    return text
  try:
    return int(text)
  except ValueError:
    raise ConfigError(f'{var}={text!r} is not an integer') from None


def _cluster_tasks(environ: Mapping[str, str]) -> int:
  """The task count of the cluster job this process is a task of (1 when
  none is detected)."""
  for count, others in CLUSTER_TASK_COUNTS.items():
    if all(var in environ for var in others):
      try:
        return int(environ[count])
      except (KeyError, ValueError):
        pass
  return 1


def _check_address(address) -> None:
  host, _, port = str(address).rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f'coordinator_address={address!r} is not allowed; '
                      'give HOST:PORT, e.g. 10.0.0.1:1234 (process 0\'s '
                      'host and a free port)')


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               environ: Mapping[str, str] = os.environ,
               timeout_s: int = 300) -> int:
  """Joins this process to the run's others (`resolve_settings`), before
  JAX computes anything; returns the number of processes (1: nothing to
  join). Raises ConfigError for invalid settings or when the coordinator
  does not answer within `timeout_s`."""
  settings = resolve_settings(coordinator_address, num_processes,
                              process_id, environ)
  if settings is None:
    return 1
  # Only the CPU backend reads it: without it, a computation across the
  # CPUs of several processes fails.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  where = (f'process {settings["process_id"]} of '
           f'{settings["num_processes"]} with the coordinator at '
           f'{settings["coordinator_address"]}' if settings
           else 'the cluster job')
  try:
    jax.distributed.initialize(**settings, initialization_timeout=timeout_s)
  except (RuntimeError, ValueError, TypeError) as e:
    reason = ' '.join(str(e).split())[:300]
    raise ConfigError(f'cannot start {where}: {reason}') from None
  return jax.process_count()


def is_main() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def on_main(fn: Callable, *args) -> int:
  """`fn(*args)` on process 0 alone, its result (an int or bool) shared
  with every process. When it raises, process 0 raises that and the others
  a ConfigError, so that all of them stop (rather than wait for process 0
  at the next collective)."""
  if jax.process_count() == 1:
    return fn(*args)
  from jax.experimental import multihost_utils
  result, error = 0, None
  if is_main():
    try:
      result = int(fn(*args) or 0)
    except Exception as e:  # Re-raised below, once the others know.
      error = e
  failed, result = multihost_utils.broadcast_one_to_all(
      np.array([error is not None, result], np.int32))
  if error is not None:
    raise error
  if failed:
    raise ConfigError('process 0 stopped the run (its error says why)')
  return int(result)


# --- the mesh ---


@functools.cache
def data_mesh() -> Mesh | None:
  """The 1-D mesh 'data' over every device of every process; None with a
  single device."""
  devices = jax.devices()
  if len(devices) == 1:
    return None
  return Mesh(np.array(devices), (AXIS,))


def check_batch_sizes(**sizes: int) -> None:
  """Raises ConfigError naming every batch size (keyword: its config
  field) that does not divide among the devices."""
  count = jax.device_count()
  bad = [f'{field}={size}' for field, size in sizes.items()
         if size % count]
  if bad:
    hosts = (f' of {jax.process_count()} processes'
             if jax.process_count() > 1 else '')
    raise ConfigError(
        f'{" and ".join(bad)} cannot be split among the {count} devices'
        f'{hosts}: every batch is split evenly across them; use a multiple '
        f'of {count}')


def replicated_sharding():
  """Where the train state lives: every device of the mesh (the one
  device without a mesh)."""
  mesh = data_mesh()
  return jax.devices()[0] if mesh is None else NamedSharding(
      mesh, PartitionSpec())


def replicate(tree):
  """`tree` (arrays or random keys) copied onto every device of the mesh;
  unchanged with one device."""
  if data_mesh() is None:
    return tree

  def put(x):
    # (A Python int, the initial step, becomes an int32 array; the steps
    # then keep it one, and compile once.)
    x = jnp.asarray(x)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      # Key arrays cannot be put across processes; their data can.
      return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    local = np.asarray(x)
    return jax.make_array_from_process_local_data(
        replicated_sharding(), local, local.shape)

  return jax.tree.map(put, tree)


def process_rows(batch_size: int) -> slice:
  """The rows of a global batch that this process's devices hold: process
  i of P the i-th contiguous block of batch_size / P."""
  sharding = NamedSharding(data_mesh(), PartitionSpec(AXIS))
  blocks = sorted(index[0].indices(batch_size)[:2] for index in
                  sharding.addressable_devices_indices_map(
                      (batch_size,)).values())
  for (_, stop), (start, _) in zip(blocks, blocks[1:]):
    if stop != start:  # Not one block: a mesh this module did not make.
      raise RuntimeError(f'the rows of process {jax.process_index()} are not '
                         f'contiguous: {blocks}')
  return slice(blocks[0][0], blocks[-1][1])


def put_batch(batch):
  """A global batch (a dict of host arrays, the same in every process)
  onto the mesh, split along its first axis: each process puts only its
  own rows (`process_rows`). `jax.device_put` with one device."""
  mesh = data_mesh()
  if mesh is None:
    return jax.device_put(batch)
  sharding = NamedSharding(mesh, PartitionSpec(AXIS))

  def put(x):
    x = np.asarray(x)
    check_batch_sizes(batch=x.shape[0])
    return jax.make_array_from_process_local_data(
        sharding, x[process_rows(x.shape[0])], x.shape)

  return jax.tree.map(put, batch)


def jit(fn: Callable, **kwargs) -> Callable:
  """`jax.jit(fn)`, with every output replicated on the mesh when there is
  one (so that every process can read the scalars, and the state stays
  replicated from step to step)."""
  if data_mesh() is None:
    return jax.jit(fn, **kwargs)
  return jax.jit(fn, out_shardings=replicated_sharding(), **kwargs)

"""Checkpoints of the train state (orbax), for exact resume.

A checkpoint holds everything the rest of a run depends on: parameters,
optimiser state, batch statistics, the step, the non-finite record and the
count of skipped steps. The random keys and the position in the data stream
are functions of `config.seed` and the step (dropout masks fold the step
into a key derived from the seed; the data order is a permutation per epoch
seeded the same way), so restoring the step restores them.

Orbax writes each checkpoint into a temporary folder and renames it when
complete, so a run killed while saving leaves no checkpoint that looks
finished. One whose files were damaged afterwards fails to restore: it is
moved aside to `<workdir>/checkpoints_damaged/` with a warning, and the one
before it is used.

In a run of several processes (`cnn_lab.distributed`) every process saves
and restores, as orbax requires, into the same folder (a filesystem all
the hosts share); the state is replicated on every device, and orbax
writes each array once.
"""

import pathlib
import shutil

import flax
import jax

from cnn_lab import distributed


class Checkpoints:
  """The checkpoints of one workdir: `<workdir>/checkpoints/<step>/`."""

  def __init__(self, workdir, keep: int = 3):
    import orbax.checkpoint as ocp  # Heavy; only when a run starts.
    self._ocp = ocp
    self.workdir = pathlib.Path(workdir).absolute()
    self.directory = self.workdir / 'checkpoints'
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            # Synchronous: once save() returns, the step is on disk.
            enable_async_checkpointing=False))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, state) -> None:
    step = int(jax.device_get(state.step))
    self._manager.save(step, args=self._ocp.args.StandardSave(
        flax.serialization.to_state_dict(state)))
    self._manager.wait_until_finished()

  def restore_latest(self, template, warn=print):
    """(state, step) from the newest checkpoint that restores, moving
    damaged ones aside; (template, 0) when there is none."""
    target = jax.tree.map(self._ocp.utils.to_shape_dtype_struct,
                          flax.serialization.to_state_dict(template))
    for step in reversed(self.steps()):
      try:
        restored = self._manager.restore(
            step, args=self._ocp.args.StandardRestore(target))
        state = flax.serialization.from_state_dict(template, restored)
        # On the device like the step's own outputs (committed arrays, the
        # step weakly typed as `state.step + 1` makes it), so that the
        # jitted step compiles once, not again after the first resumed step;
        # with several devices, on all of them (`distributed`).
        state = jax.device_put(state, distributed.replicated_sharding())
        return state, step
      except Exception as e:  # Any failure to read it: damaged.
        reason = ' '.join(str(e).split())[:200]
        aside = self.workdir / 'checkpoints_damaged' / str(step)
        warn(f'  warning: checkpoint {self.directory / str(step)} is damaged '
             f'({type(e).__name__}: {reason}); moved to {aside}, trying the '
             'one before', flush=True)
        distributed.on_main(_move_aside, self.directory / str(step), aside)
        self._manager.reload()
    return template, 0

  def close(self):
    self._manager.close()


def _move_aside(path: pathlib.Path, aside: pathlib.Path) -> None:
  aside.parent.mkdir(exist_ok=True)
  if aside.exists():
    shutil.rmtree(aside)
  shutil.move(str(path), aside)

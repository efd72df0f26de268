"""Runs that differ only in their seed, trained together in one program.

`train_seed_group(configs, workdirs)` trains K configs that are the same
but for `seed` at once: their train states, batches and dropout keys are
stacked on a new leading axis, and the steps of `cnn_lab.steps` (train
step, probe, evaluation, histograms) are `jax.vmap`-ed over it and
compiled once. Each seed keeps what a run of its own has: its
initialisation and dropout key (made from its seed by `train.build_run`),
its data order (`train_batches(batch_size, seed)`), and its workdir, with
the files `train.train_and_evaluate` writes there (config.json with its
own seed, layers.json, activations.json, metrics.jsonl, TensorBoard
events, plots, checkpoints), so that plots, reports and a later resume
(by a group or by a run alone) read it as any run's. The results equal
those of separate runs up to float rounding: vmapped products and sums may
add in another order (tests/test_seed_group.py compares them). oneDNN's
convolutions take the stacked seeds in one call (kernels/onednn.py,
VMAP_METHOD).

What it gains (`python -m cnn_lab.bench.seeds`, 8 seeds, batch 128, the
2-core CPU): one compilation instead of one per run, and per step little
or nothing. LeNet-5's bare step 1.30x as fast as the 8 separate steps,
its step with statistics 1.01x; ResNet-20's 0.85x and 0.82x (slower, 13%
more CPU time: likely its stacked activations, 1,574 MiB by XLA's
estimate against a run's 197, streaming from memory). The CPU time of
the 8 seeds' steps is about the same either way (LeNet-5 63 ms separate
against 54 vmapped, ResNet-20 1,956 against 2,214): vmap saves waiting
and dispatch, not work, and a run's step at batch 128 already keeps both
cores mostly busy.

Divergence stays per seed: every op of the vmapped step computes each
seed from its own values only (the search for where non-finite values
started runs for all seeds at a step where any needs it, see
`steps.train_step`'s seed_axis, and its result is used for those that
need it). With on_nonfinite='skip' each seed drops its own updates. With
'halt' a diverged seed stops where a run of its own would (at its next
logged or checkpoint step, its line written, its plots drawn, no
checkpoint after the divergence) and leaves the group; the others go on
together, compiled again for one seed fewer. When they are done, `Diverged`
is raised naming the seeds that halted; its `results` holds every seed's
last evaluation, None for those.

Resume: each seed restores its own newest complete checkpoint
(`train.restore`). Seeds whose run is complete are left alone; when all
are, their last evaluations are returned and nothing is compiled. The
seeds of a group normally hold checkpoints of the same steps. Where they
do not (a damaged checkpoint set aside, a process killed between two
seeds' saves), the seeds furthest behind train first, and each of the
others joins the group at the step its own checkpoint holds: every seed
takes each of its steps once, from its own state, as it would alone.

One device only: with several (a data-parallel mesh, cnn_lab.distributed)
a group is refused; train its seeds one by one instead.
"""

import copy
import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnn_lab import data as data_lib
from cnn_lab import steps as steps_lib
from cnn_lab import train, writers
from cnn_lab.errors import ConfigError

SEED_AXIS = 'seeds'  # The vmapped axis (`steps.train_step`'s seed_axis).


class Diverged(train.Diverged):
  """Seeds of the group diverged under on_nonfinite='halt'. Raised once the
  others are done; `results` is every seed's last evaluation (None for
  the seeds that halted), in the order of the configs."""

  def __init__(self, message: str, results: list[dict | None]):
    super().__init__(message)
    self.results = results


@dataclasses.dataclass
class Member:
  """One run of the group, and where it stands."""
  label: str  # 'seed=N', in printed lines.
  workdir: pathlib.Path
  run: train.Run
  state: Any  # Its own train state (not stacked) after `step` steps.
  step: int
  outputs: train.Outputs | None = None  # Open while it trains.
  reported: bool = False  # Its first non-finite step is in its metrics.
  result: dict | None = None  # Its last evaluation.
  diverged: str | None = None  # Why it halted.

  @property
  def training(self) -> bool:
    return self.diverged is None and self.step < self.run.num_steps


def train_seed_group(configs, workdirs, overwrite: bool = False
                     ) -> list[dict]:
  """Trains `configs`, which may differ only in `seed`, together, each
  into its workdir; returns each run's final evaluation metrics, as
  `train.train_and_evaluate` does for one.

  Raises ConfigError (nothing written) for configs that differ in another
  field, a repeated seed or workdir, an invalid config or a workdir
  holding another config's run (unless `overwrite`), and `Diverged` when
  seeds diverged under on_nonfinite='halt' (module docstring)."""
  workdirs = [pathlib.Path(w) for w in workdirs]
  check_group(configs, workdirs)
  options = [train.validate_config(c, w) for c, w in zip(configs, workdirs)]
  if jax.device_count() > 1:
    raise ConfigError(
        f'a seed group trains on one device, and this process has '
        f'{jax.device_count()}: train the seeds one by one (--novmap_seeds)'
        ' or give each task one device')
  members = start_members(configs, workdirs, options, overwrite)
  t_begin = time.perf_counter()
  compiled = {}
  while any(m.training for m in members):
    # The seeds furthest behind train until the next one's step, where it
    # joins them (normally all start at the same step: one phase).
    waiting = [m for m in members if m.training]
    step = min(m.step for m in waiting)
    until = min([m.step for m in waiting if m.step > step],
                default=members[0].run.num_steps)
    train_phase([m for m in waiting if m.step == step], step, until,
                compiled, t_begin)
  results = [m.result for m in members]
  halted = [m.diverged for m in members if m.diverged]
  if halted:
    raise Diverged('; '.join(halted), results)
  return results


def check_group(configs, workdirs: list[pathlib.Path]) -> None:
  """Raises ConfigError unless the configs differ in `seed` alone, with
  one seed and one workdir each."""
  if not configs or len(configs) != len(workdirs):
    raise ConfigError(f'a seed group needs one workdir per config: '
                      f'{len(configs)} configs, {len(workdirs)} workdirs')
  folders = [w.absolute() for w in workdirs]
  for i, folder in enumerate(folders):
    if folder in folders[:i]:
      raise ConfigError(f'two runs of the seed group have the workdir '
                        f'{workdirs[i]}')
  seeds = [c.seed for c in configs]
  for i, seed in enumerate(seeds):
    if seed in seeds[:i]:
      raise ConfigError(f'the seed group has seed={seed!r} twice')
  first = _without_seed(configs[0])
  for i, config in enumerate(configs[1:], 1):
    differing = train._differing_fields(first, _without_seed(config))
    if differing:
      field, a, b = differing[0]
      raise ConfigError(
          f'the runs of a seed group may differ only in seed, but run {i} '
          f'({workdirs[i]}) has {field}={b!r} where the first has {a!r}')


def _without_seed(config) -> dict:
  resolved = json.loads(json.dumps(config.to_dict(), default=str))
  resolved.pop('seed', None)
  return resolved


def start_members(configs, workdirs, options, overwrite: bool
                  ) -> list[Member]:
  """Each seed's run built (the dataset loaded once), its workdir prepared
  and its newest checkpoint restored; the outputs of those still to
  train opened, the evaluation of those complete read back."""
  runs, datasets = [], None
  for config, opts in zip(configs, options):
    runs.append(train.build_run(config, opts, _own_data_order(datasets)))
    datasets = runs[0][0].datasets
  if not overwrite:
    # Every workdir is checked before any is written: a refused group
    # leaves them all as they were.
    for (run, _), workdir in zip(runs, workdirs):
      train._check_existing_run(workdir, run.resolved, False)
  members = []
  for (run, state), workdir in zip(runs, workdirs):
    resume = train.prepare_workdir(workdir, run, state, overwrite)
    state, start, checkpoints = train.restore(workdir, state, resume,
                                              run.options)
    member = Member(f'seed={run.seed}', workdir, run, state, start)
    if start >= run.num_steps:
      checkpoints.close()
      print(f'  {member.label}: the run was already complete '
            f'({run.num_steps} steps)', flush=True)
      member.result = train._last_evaluation(workdir)
    else:
      member.outputs = train.Outputs(
          writers.MetricsWriter(workdir, train.metric_keys(run)),
          checkpoints)
      member.reported = any('nonfinite/first_step' in line
                            for line in writers.read_metrics(workdir))
    members.append(member)
  return members


def _own_data_order(datasets):
  """The datasets already loaded, with a training pipeline of its own for
  the next seed (the arrays are shared; its shuffle cache is its own)."""
  if datasets is None:
    return None
  return dataclasses.replace(datasets, train=copy.copy(datasets.train))


# --- stacking ---


def stack(trees: list):
  """The trees' arrays stacked on a new leading axis, in one compiled call
  (the structure of the first: the members' train states differ only in
  functions)."""
  leaves = [jax.tree.leaves(t) for t in trees]
  return jax.tree.unflatten(jax.tree.structure(trees[0]),
                            _stack_leaves(leaves))


@jax.jit
def _stack_leaves(leaves):
  return [jnp.stack(xs) for xs in zip(*leaves)]


def unstack(tree, i: int):
  """Member `i` of a stacked tree of host arrays."""
  return jax.tree.map(lambda x: x[i], tree)


@jax.jit
def take(tree, i):
  """Member `i` of a stacked tree on the device, in one compiled call for
  every i."""
  return jax.tree.map(lambda x: x[i], tree)


def stacked_batches(group: list[Member], start: int):
  """The group's training batches from step `start` on: each seed's own
  batch of that step, stacked (host arrays)."""
  streams = [m.run.datasets.train.train_batches(
      m.run.batch_size, m.run.seed, start_step=start) for m in group]
  while True:
    parts = [next(s) for s in streams]
    yield {k: np.stack([p[k] for p in parts]) for k in parts[0]}


def compile_group_steps(run: train.Run, state, batch, keys,
                        t_begin: float) -> train.Steps:
  """`train.compile_steps` for a group: each step vmapped over the stacked
  seeds (the probe and evaluation batches are the same for all)."""
  vmap = lambda fn, in_axes=0: jax.vmap(fn, in_axes=in_axes,
                                        axis_name=SEED_AXIS)
  probe = jax.jit(vmap(steps_lib.probe_step, (0, None)))
  jax.block_until_ready(probe(state, run.probe_batch))
  versions = train.train_step_versions(run)
  trains = {v: jax.jit(vmap(train.train_step_fn(run, v, seed_axis=SEED_AXIS)),
                       donate_argnums=(0,)).lower(state, batch, keys).compile()
            for v in versions}
  which = ' (with and without statistics)' if len(versions) > 1 else ''
  seeds = f'{len(keys)} seed' + ('s' if len(keys) > 1 else '')
  print(f'  compiled the train step{which} and the probe for {seeds} in '
        f'{time.perf_counter() - t_begin:.1f}s', flush=True)
  return train.Steps(
      train=trains, histogram=jax.jit(vmap(train.histogram_fn(run))),
      probe=probe, eval=jax.jit(vmap(steps_lib.eval_step, (0, None))))


# --- the loop ---


def train_phase(group: list[Member], start: int, until: int,
                compiled: dict, t_begin: float) -> None:
  """Steps `start + 1` to `until` of the seeds in `group` (all at step
  `start`), or fewer when one of them halts: `train.train_loop` for each,
  in one program. Leaves each member's state and step where it stopped;
  finishes the members whose runs are complete."""
  run = group[0].run  # As every member's, but for seed and data order.
  cadence = run.cadence
  state = stack([m.state for m in group])
  keys = jnp.stack([m.run.dropout_key for m in group])
  batches = data_lib.prefetch(stacked_batches(group, start), size=3,
                              transform=jax.device_put)
  first = next(batches)
  # Compiled once for each group size (and, to be safe, each signature).
  signature = tuple((x.shape, x.dtype, getattr(x, 'weak_type', False))
                    for x in jax.tree.leaves((state, first, keys)))
  if signature not in compiled:
    compiled[signature] = compile_group_steps(run, state, first, keys,
                                              t_begin)
  steps = compiled[signature]
  progress = train.Progress(run.num_steps, run.batch_size * len(group))
  step, batch = start, first
  while step < until and not any(m.diverged for m in group):
    step += 1
    if step > start + 1:
      batch = next(batches)
    if cadence.histograms(step):
      arrays = jax.device_get(steps.histogram(state, batch, keys))
      for i, m in enumerate(group):
        m.outputs.writer.write_histograms(step, unstack(arrays, i))
    state, scalars = steps.train_step(step, cadence)(state, batch, keys)
    if step == start + 1:
      progress.start(state, step)
    if cadence.logs(step):
      log_group_step(group, steps, state, step, scalars, progress)
    if cadence.evaluates(step):
      evaluate_group(group, steps, state, step)
    if cadence.checkpoints(step):
      checkpoint_group(group, state, step)
  batches.close()
  for i, m in enumerate(group):
    if m.diverged is None:
      m.state, m.step = take(state, i), step
      if step == run.num_steps:
        train.finish(m.outputs, t_begin, m.run.options.plots)


def log_group_step(group: list[Member], steps: train.Steps, state,
                   step: int, scalars, progress: train.Progress) -> None:
  """`train.log_step` for each seed still in the group: its line, the
  progress (the group's rate), and a halt where it diverged."""
  run = group[0].run
  scalars = jax.device_get({**scalars, **steps.probe(state, run.probe_batch)})
  first_bad = jax.device_get(state.first_nonfinite)
  printed = False
  for i, m in enumerate(group):
    if m.diverged:
      continue
    own = unstack(scalars, i)
    if first_bad[i][0] >= 0 and not m.reported:
      m.reported = True
      own.update(train._nonfinite_report(
          first_bad[i], run.layer_names, run.sites))
    line = m.outputs.writer.write(step, own)
    if _halts(m, first_bad[i]):
      continue
    if not printed:  # The group's progress, with this seed's numbers.
      print(f'{progress.line(step, line)}  [{m.label}]', flush=True)
      printed = True
    else:
      print(f'  {" " * (2 * len(str(run.num_steps)) + 6)}loss '
            f'{train._fmt(line["train/loss"])}  '
            f'acc {train._fmt(line["train/accuracy"], 3)}  '
            f'probe loss {train._fmt(line["probe/loss"])}'
            f'  [{m.label}]', flush=True)


def evaluate_group(group: list[Member], steps: train.Steps, state,
                   step: int) -> None:
  """The evaluation of every seed, written for those still in the group."""
  run = group[0].run
  results = train.evaluate(steps.eval, state, run.datasets.test,
                           run.eval_batch_size, run.eval_num_examples)
  for i, m in enumerate(group):
    if m.diverged:
      continue
    m.result = {k: float(v[i]) for k, v in results.items()}
    m.outputs.writer.write(step, m.result)
    print(f'  eval at step {step}: loss {m.result["eval/loss"]:.4f}  '
          f'accuracy {m.result["eval/accuracy"]:.4f}  [{m.label}]',
          flush=True)


def checkpoint_group(group: list[Member], state, step: int) -> None:
  """Each seed's checkpoint, but for those that diverged (they halt)."""
  first_bad = jax.device_get(state.first_nonfinite)
  for i, m in enumerate(group):
    if m.diverged or _halts(m, first_bad[i]):
      continue
    m.outputs.writer.flush()  # Every line of this step is on disk first.
    m.outputs.checkpoints.save(take(state, i))


def _halts(member: Member, first_bad) -> bool:
  """`train._halt_if_diverged` for one seed: when it diverged under
  'halt', its files are closed and its plots drawn, and it leaves the
  group (True)."""
  try:
    train._halt_if_diverged(member.run, first_bad, member.outputs)
  except train.Diverged as e:
    member.diverged = f'{member.label}: {e}'
    member.result = None
    print(f'  {member.label} stopped: {e}', flush=True)
    return True
  return False

"""Batch norm at inference: moving averages against each batch's own
statistics, down to batch size 1, and the moving averages' momentum."""

import json
import os
import subprocess
import sys

from cnn_lab.errors import ConfigError
from cnn_lab.experiments import ROOT, Stage, common

TITLE = 'Batch norm at inference'
QUESTION = ('how do moving-average inference and training-mode batch norm '
            'compare, what happens at batch size 1, and how does the moving '
            'averages\' momentum matter?')

STAGES = (
    Stage('resnet20', 'resnet20.py',
          cpu=('--config.model.width=0.5', '--config.train.batch_size=64',
               '--config.train.num_steps=300', '--config.log_every_steps=10',
               '--config.eval_num_examples=2000', '--parallel=2'),
          tiny=('--config.model.width=0.25',)),
)
# Evaluation batch sizes in training mode, and the examples evaluated.
BATCH_SIZES = {'cpu': (500, 50, 8, 2, 1), 'full': (500, 50, 8, 2, 1),
               'tiny': (16, 2, 1)}
EXAMPLES = {'cpu': 1000, 'full': 10000, 'tiny': 16}
RESULT = 'inference.json'


def evaluate(workdir, budget: str) -> list[dict]:
  """`python -m cnn_lab.evaluate` on one run (its own process: it needs the
  model, this module only the files); its rows."""
  sizes = BATCH_SIZES[budget]
  cmd = [sys.executable, '-m', 'cnn_lab.evaluate', str(workdir),
         '--modes', 'moving,batch', '--batch_sizes',
         ','.join(map(str, sizes)), '--num_examples', str(EXAMPLES[budget]),
         '--out', str(workdir / RESULT)]
  print(f'  {" ".join(cmd[1:])}', flush=True)
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ,
                                                PYTHONUNBUFFERED='1'))
  if proc.returncode:
    raise ConfigError(f'cnn_lab.evaluate failed on {workdir} (status '
                      f'{proc.returncode}; its output is above)')
  data = json.loads((workdir / RESULT).read_text())
  return data['results'] if isinstance(data, dict) else data


def _cell(rows, mode, size):
  for r in rows:
    if r['mode'] == mode and r['batch_size'] == size:
      return r['accuracy']
  return None


def _gap(e) -> float | None:
  """Mean over the BN layers of the last logged |running − batch mean|
  gap (bn_mean_gap/<layer>)."""
  if e.run is None:
    return None
  values = [e.last(f'bn_mean_gap/{n}') for n in e.run.bn_layers]
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def analyse(folders, figdir, budget: str) -> str:
  entries = common.load(folders['resnet20'])
  sizes = BATCH_SIZES[budget]
  results = {e.name: evaluate(e.run.workdir, budget) for e in entries
             if e.run is not None}
  rows = []
  for e in entries:
    res = results.get(e.name, [])
    rows.append([e['bn_momentum'], e.status, e.steps(),
                 common.acc(e.last('eval/accuracy')),
                 common.acc(_cell(res, 'moving', sizes[0])),
                 *[common.acc(_cell(res, 'batch', s)) for s in sizes],
                 e.last('probe/bn_train_eval_gap'), _gap(e)])
  fig, axes = common.plt.subplots(1, 2, figsize=(11, 4))
  for i, e in enumerate(entries):
    res = results.get(e.name, [])
    colour = common.COLOURS[i]
    ys = [_cell(res, 'batch', s) for s in sizes]
    axes[0].plot(sizes, [y if y is not None else float('nan') for y in ys],
                 marker='o', color=colour,
                 label=f'momentum {e["bn_momentum"]}: batch statistics')
    moving = _cell(res, 'moving', sizes[0])
    if moving is not None:
      axes[0].axhline(moving, color=colour, linestyle='--',
                      label=f'momentum {e["bn_momentum"]}: moving averages')
    if e.run is not None and e.run.bn_layers:
      layer = e.run.bn_layers[-1]
      common.plot_curve(axes[1], e, f'bn_mean_gap/{layer}',
                        f'momentum {e["bn_momentum"]}', colour)
  axes[0].set_xscale('log')
  axes[0].set_xlabel('evaluation batch size (training-mode BN)')
  axes[0].set_ylabel('test accuracy')
  axes[0].set_title('test accuracy: batch statistics against moving averages')
  axes[0].legend(fontsize=7)
  last = next((e.run.bn_layers[-1] for e in entries
               if e.run is not None and e.run.bn_layers), '')
  axes[1].set_title(f'running against batch mean, {last}')
  axes[1].set_xlabel('step')
  axes[1].set_ylabel('bn_mean_gap')
  axes[1].set_yscale('log')
  axes[1].legend(fontsize=8)
  fig_path = common.save(fig, figdir, 'inference_modes')
  head = (['momentum', 'status', 'steps', 'logged eval acc',
           f'moving averages (batch {sizes[0]})']
          + [f'batch stats, batch {s}' for s in sizes]
          + ['probe loss eval − train', 'running − batch mean gap (mean '
             'over layers)'])
  return '\n\n'.join([
      f'Test accuracy on {EXAMPLES[budget]} test images (training-mode rows '
      'use only whole batches).', common.table(head, rows),
      common.figure_link(fig_path, fig_path.stem)])

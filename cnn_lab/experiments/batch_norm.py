"""Batch norm: VGG16 and GoogLeNet (BN-Inception) with and without it."""

import math

from cnn_lab.experiments import Stage, common

TITLE = 'Batch norm'
QUESTION = ('does batch norm keep the gradients even across depth, reach a '
            'test accuracy in fewer steps and train at larger learning '
            'rates; how far apart are its train and eval modes?')
FOUND = ''  # Filled in the top README by hand, from results.md.

_CPU = ('--config.model.width=0.25', '--config.train.batch_size=64',
        '--config.log_every_steps=10', '--config.eval_every_steps=50',
        '--config.eval_num_examples=1000', '--parallel=2')
STAGES = (
    Stage('vgg16', 'vgg16.py', cpu=_CPU + ('--config.train.num_steps=250',),
          tiny=('--config.model.width=0.0625',)),
    Stage('inception', 'inception.py',
          cpu=_CPU + ('--config.train.num_steps=150',),
          tiny=('--config.model.width=0.0625',)),
)
# Test accuracy a run must reach to count as "reached"; and, at the end, to
# count as training at all (five times chance on ten classes).
TARGET = {'cpu': 0.75, 'full': 0.9, 'tiny': 0.0}
TRAINS = 0.5


def _trains(entry) -> bool:
  final = entry.last('eval/accuracy')
  return (not entry.diverged and final is not None and final >= TRAINS)


def _ratio(entry, line) -> float | None:
  values = entry.layer_values(line, 'grad_norm')
  if len(values) < 2 or not all(math.isfinite(v) for v in values) or not (
      values[-1] > 0):
    return None
  return values[0] / values[-1]


def _rows(entries, target):
  rows = []
  for e in entries:
    rows.append([e['norm'], e['learning_rate'], e.status,
                 common.acc(e.last('train/accuracy')),
                 common.acc(e.last('eval/accuracy')),
                 common.steps_to(e, target) or 'not reached',
                 _ratio(e, e.first_line()), _ratio(e, e.last_line()),
                 e.last('probe/bn_train_eval_gap')])
  return rows


def _largest(entries, norm):
  ok = [e['learning_rate'] for e in common.pick(entries, norm=norm)
        if _trains(e)]
  return max(ok) if ok else None


def _gradient_figure(entries, figdir, lr, name):
  fig, axes = common.plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, when in zip(axes, ('first', 'last')):
    for i, norm in enumerate(('batch', 'none')):
      e = common.one(entries, norm=norm, learning_rate=lr)
      if e is None or e.run is None:
        continue
      line = e.first_line() if when == 'first' else e.last_line()
      common.plot_depth(ax, e, line, 'grad_norm',
                        f'norm={norm} (step {line.get("step")})',
                        common.COLOURS[i])
    layers = next((e.layers for e in entries if e.layers), [])
    common.depth_axis(ax, layers)
    ax.set_yscale('log')
    ax.set_title(('at initialisation' if when == 'first' else
                  'at the end') + f', learning rate {lr}')
    ax.legend(fontsize=8)
  axes[0].set_ylabel('gradient L2 norm of the layer')
  return common.save(fig, figdir, name)


def _accuracy_figure(entries, figdir, name, title):
  fig, axes = common.plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  rates = sorted({e['learning_rate'] for e in entries})
  for ax, norm in zip(axes, ('batch', 'none')):
    for i, lr in enumerate(rates):
      e = common.one(entries, norm=norm, learning_rate=lr)
      if e is not None:
        common.plot_curve(ax, e, 'eval/accuracy', f'lr {lr}'
                          + (' (diverged)' if e.diverged else ''),
                          common.COLOURS[i % 10], marker='.')
    ax.set_title(f'{title}, norm={norm}')
    ax.set_xlabel('step')
    ax.legend(fontsize=8)
  axes[0].set_ylabel('test accuracy')
  return common.save(fig, figdir, name)


def _final_figure(entries, figdir):
  fig, ax = common.plt.subplots(figsize=(5.5, 4))
  for i, norm in enumerate(('batch', 'none')):
    pts = sorted((e['learning_rate'], e.last('eval/accuracy') or 0.0)
                 for e in common.pick(entries, norm=norm))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o',
            label=f'norm={norm}', color=common.COLOURS[i])
  ax.axhline(TRAINS, color='grey', linestyle=':', label='"trains" threshold')
  ax.set_xscale('log')
  ax.set_xlabel('learning rate')
  ax.set_ylabel('final test accuracy')
  ax.set_title('VGG16: final test accuracy against learning rate')
  ax.legend(fontsize=8)
  return common.save(fig, figdir, 'vgg16_accuracy_by_lr')


HEAD = ['norm', 'lr', 'status', 'train acc', 'test acc', 'steps to target',
        'grad first/last, step 1', 'grad first/last, end',
        'BN probe loss eval − train']


def analyse(folders, figdir, budget: str) -> str:
  target = TARGET[budget]
  vgg = common.load(folders['vgg16'])
  inc = common.load(folders['inception'])
  rates = sorted({e['learning_rate'] for e in vgg})
  mid = 0.01 if 0.01 in rates else rates[0]
  figs = [
      _gradient_figure(vgg, figdir, mid, 'vgg16_gradient_flow'),
      _accuracy_figure(vgg, figdir, 'vgg16_test_accuracy', 'VGG16'),
      _final_figure(vgg, figdir),
      _gradient_figure(inc, figdir, 0.05, 'inception_gradient_flow'),
      _accuracy_figure(inc, figdir, 'inception_test_accuracy', 'GoogLeNet'),
  ]
  largest = [[norm, _largest(vgg, norm) or 'none trains',
              _largest(inc, norm) or 'none trains']
             for norm in ('batch', 'none')]
  return '\n\n'.join([
      f'**VGG16** (target test accuracy {target}; "grad first/last" is the '
      'first weight layer\'s gradient norm over the last one\'s):',
      common.table(HEAD, _rows(vgg, target)),
      '**GoogLeNet** (norm=batch is BN-Inception\'s change):',
      common.table(HEAD, _rows(inc, target)),
      f'**Largest learning rate that trains** (final test accuracy '
      f'≥ {TRAINS}, not diverged):',
      common.table(['norm', 'VGG16', 'GoogLeNet'], largest),
      *[common.figure_link(f, f.stem) for f in figs],
  ])

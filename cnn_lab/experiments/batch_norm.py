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
          cpu=_CPU + ('--config.train.num_steps=80',),
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


_INIT = {'glorot_uniform': 'Glorot', 'he_normal': 'He', 'normal': 'normal'}


def _variant(entry) -> str:
  """'BN', 'no BN', or with the swept initialisation: 'no BN, He'."""
  name = 'BN' if entry['norm'] == 'batch' else 'no BN'
  init = entry['kernel_init']
  return f'{name}, {_INIT.get(init, init)}' if init else name


def _variants(entries) -> list[str]:
  return list(dict.fromkeys(_variant(e) for e in entries))


def _of(entries, variant, lr=None):
  return [e for e in entries if _variant(e) == variant
          and (lr is None or e['learning_rate'] == lr)]


def _rows(entries, target):
  rows = []
  for e in entries:
    rows.append([_variant(e), e['learning_rate'], e.status,
                 common.acc(e.last('train/accuracy')),
                 common.acc(e.last('eval/accuracy')),
                 common.steps_to(e, target) or 'not reached',
                 _ratio(e, e.first_line()), _ratio(e, e.last_line()),
                 e.last('probe/bn_train_eval_gap')])
  return rows


def _largest(entries, variant):
  ok = [e['learning_rate'] for e in _of(entries, variant) if _trains(e)]
  return max(ok) if ok else None


def _gradient_figure(entries, figdir, lr, name):
  fig, axes = common.plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, when in zip(axes, ('first', 'last')):
    for i, variant in enumerate(_variants(entries)):
      found = _of(entries, variant, lr)
      if not found or found[0].run is None:
        continue
      e = found[0]
      line = e.first_line() if when == 'first' else e.last_line()
      common.plot_depth(ax, e, line, 'grad_norm',
                        f'{variant} (step {line.get("step")})',
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
  variants = _variants(entries)
  fig, axes = common.plt.subplots(1, len(variants),
                                  figsize=(5.5 * len(variants), 4),
                                  sharey=True, squeeze=False)
  rates = sorted({e['learning_rate'] for e in entries})
  for ax, variant in zip(axes[0], variants):
    for i, lr in enumerate(rates):
      for e in _of(entries, variant, lr):
        common.plot_curve(ax, e, 'eval/accuracy', f'lr {lr}'
                          + (' (diverged)' if e.diverged else ''),
                          common.COLOURS[i % 10], marker='.')
    ax.set_title(f'{title}, {variant}')
    ax.set_xlabel('step')
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel('test accuracy')
  return common.save(fig, figdir, name)


def _final_figure(entries, figdir):
  fig, ax = common.plt.subplots(figsize=(5.5, 4))
  for i, variant in enumerate(_variants(entries)):
    runs = _of(entries, variant)
    pts = sorted((e['learning_rate'], e.last('eval/accuracy'))
                 for e in runs if not e.diverged
                 and e.last('eval/accuracy') is not None)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o',
            label=variant, color=common.COLOURS[i])
    lost = sorted(e['learning_rate'] for e in runs if e.diverged)
    if lost:  # No accuracy to draw: a cross on the axis.
      ax.plot(lost, [0.0] * len(lost), linestyle='none', marker='x',
              markersize=9, color=common.COLOURS[i],
              label=f'{variant}: diverged')
  ax.axhline(TRAINS, color='grey', linestyle=':', label='"trains" threshold')
  ax.set_xscale('log')
  ax.set_xlabel('learning rate')
  ax.set_ylabel('final test accuracy')
  ax.set_title('VGG16: final test accuracy against learning rate')
  ax.legend(fontsize=8)
  return common.save(fig, figdir, 'vgg16_accuracy_by_lr')


HEAD = ['variant', 'lr', 'status', 'train acc', 'test acc', 'steps to target',
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
  largest = []
  for model, entries in (('VGG16', vgg), ('GoogLeNet', inc)):
    for variant in _variants(entries):
      largest.append([model, variant,
                      _largest(entries, variant) or 'none trains',
                      ', '.join(str(lr) for lr in sorted(
                          e['learning_rate'] for e in _of(entries, variant)))])
  return '\n\n'.join([
      f'**VGG16** (target test accuracy {target}; "grad first/last" is the '
      'first weight layer\'s gradient norm over the last one\'s):',
      common.table(HEAD, _rows(vgg, target)),
      '**GoogLeNet** (BN after every convolution is BN-Inception\'s change; '
      'the config\'s initialisation, normal with std 0.01):',
      common.table(HEAD, _rows(inc, target)),
      f'**Largest learning rate that trains** (final test accuracy '
      f'≥ {TRAINS}, not diverged):',
      common.table(['network', 'variant', 'largest that trains', 'tried'],
                   largest),
      *[common.figure_link(f, f.stem) for f in figs],
  ])

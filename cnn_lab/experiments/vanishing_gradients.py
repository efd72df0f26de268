"""Vanishing gradients: activations and initialisations (Glorot & Bengio)."""

import math

from cnn_lab.experiments import Stage, common

TITLE = 'Vanishing gradients'
QUESTION = ('how do sigmoid, tanh and ReLU with small, Glorot and He '
            'initialisation carry the gradient back to the input layers, '
            'and does the top hidden layer saturate?')

STAGES = (
    Stage('lenet', 'lenet.py',
          cpu=('--config.train.num_steps=400', '--config.log_every_steps=10',
               '--config.eval_num_examples=2000', '--executor=inprocess'),
          tiny=('--config.model.width=0.5',)),
    Stage('plain', 'plain.py',
          cpu=('--config.model.width=0.5', '--config.train.batch_size=64',
               '--config.train.num_steps=200', '--config.log_every_steps=10',
               '--config.eval_num_examples=1000', '--parallel=2'),
          tiny=('--config.model.width=0.25',)),
)
ACTIVATIONS = ('sigmoid', 'tanh', 'relu')
INITS = ('normal', 'glorot_uniform', 'he_normal')
TOP_SITE = {'lenet': 'fc2_act'}  # The top hidden layer's activation.


def _first_last(e, line):
  values = e.layer_values(line, 'grad_norm')
  if len(values) < 2:
    return None, None, None
  ratio = (values[0] / values[-1] if math.isfinite(values[0])
           and values[-1] and math.isfinite(values[-1]) else None)
  return values[0], values[-1], ratio


def _top_site(e, stage):
  if stage in TOP_SITE:
    return TOP_SITE[stage]
  sites = e.run.sites if e.run else []
  return sites[-1] if sites else None


def _rows(entries, stage):
  rows = []
  for e in entries:
    first, last, ratio = _first_last(e, e.first_line())
    site = _top_site(e, stage)
    kind = 'dead' if e['activation'] == 'relu' else 'saturated'
    rows.append([e['activation'], e['kernel_init'], e.status, first, last,
                 ratio, f'{kind}: ' + common.num(
                     e.first_line().get(f'act_{kind}/{site}')),
                 common.num(e.last(f'act_{kind}/{site}')),
                 common.acc(e.last('eval/accuracy'))])
  return rows


def _depth_figure(entries, figdir, stage, title):
  fig, axes = common.plt.subplots(1, 3, figsize=(14, 4), sharey=True)
  layers = max((e.layers for e in entries), key=len, default=[])
  for ax, init in zip(axes, INITS):
    for i, act in enumerate(ACTIVATIONS):
      e = common.one(entries, activation=act, kernel_init=init)
      if e is not None and e.run is not None:
        common.plot_depth(ax, e, e.first_line(), 'grad_norm', act,
                          common.COLOURS[i])
    common.depth_axis(ax, layers, every=1 if len(layers) < 10 else 3)
    ax.set_yscale('log')
    ax.set_title(f'{title}, {init} init: step 1')
    ax.legend(fontsize=8)
  axes[0].set_ylabel('gradient L2 norm of the layer')
  return common.save(fig, figdir, f'{stage}_gradient_by_layer_at_init')


def _saturation_figure(entries, figdir, stage, title):
  fig, axes = common.plt.subplots(1, 3, figsize=(14, 4), sharey=True)
  for ax, init in zip(axes, INITS):
    for i, act in enumerate(ACTIVATIONS):
      e = common.one(entries, activation=act, kernel_init=init)
      if e is None or e.run is None:
        continue
      site = _top_site(e, stage)
      kind = 'dead' if act == 'relu' else 'saturated'
      common.plot_curve(ax, e, f'act_{kind}/{site}', f'{act} ({kind})',
                        common.COLOURS[i])
    ax.set_title(f'{title}, {init} init: top hidden layer')
    ax.set_xlabel('step')
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
  axes[0].set_ylabel('fraction of units saturated (dead for ReLU)')
  return common.save(fig, figdir, f'{stage}_top_layer_saturation')


def _mean_figure(entries, figdir, stage, title):
  """Glorot & Bengio's Fig. 2: the top hidden layer's mean activation."""
  fig, ax = common.plt.subplots(figsize=(6, 4))
  for i, init in enumerate(INITS):
    e = common.one(entries, activation='sigmoid', kernel_init=init)
    if e is not None and e.run is not None:
      common.plot_curve(ax, e, f'act_mean/{_top_site(e, stage)}',
                        f'sigmoid, {init}', common.COLOURS[i])
  ax.set_title(f'{title}: sigmoid top hidden layer, mean activation')
  ax.set_xlabel('step')
  ax.set_ylabel('mean activation')
  ax.legend(fontsize=8)
  return common.save(fig, figdir, f'{stage}_sigmoid_top_mean')


HEAD = ['activation', 'init', 'status', 'first-layer grad, step 1',
        'last-layer grad, step 1', 'first/last', 'top hidden layer, step 1',
        'top hidden layer, end', 'test acc']


def analyse(folders, figdir, budget: str) -> str:
  parts = []
  for stage, title in (('lenet', 'LeNet-5 classic'),
                       ('plain', 'plain-20, no BN')):
    entries = common.load(folders[stage])
    figs = [_depth_figure(entries, figdir, stage, title),
            _saturation_figure(entries, figdir, stage, title),
            _mean_figure(entries, figdir, stage, title)]
    parts += [f'**{title}**:', common.table(HEAD, _rows(entries, stage)),
              *[common.figure_link(f, f.stem) for f in figs]]
  return '\n\n'.join(parts)

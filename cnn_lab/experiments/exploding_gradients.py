"""Exploding gradients: a large learning rate or initialisation, and the two
fixes (global-norm clipping, batch norm)."""

from cnn_lab.experiments import Stage, common

TITLE = 'Exploding gradients'
QUESTION = ('where does a deep plain net first go non-finite under a large '
            'learning rate or initialisation, and do clipping and batch norm '
            'make it train?')

STAGES = (
    Stage('plain', 'plain.py',
          cpu=('--config.model.width=0.5', '--config.train.batch_size=64',
               '--config.train.num_steps=200', '--config.log_every_steps=5',
               '--config.eval_num_examples=1000', '--parallel=2'),
          tiny=('--config.model.width=0.25',)),
)

BASELINE_LR = 0.02  # experiments/exploding_gradients/plain.py's.


def _dead_top(e) -> float | None:
  """The fraction of dead units in the last ReLU layer at the last logged
  step whose gradient is finite."""
  line = e.last_line() if e.run else {}
  keys = [k for k in line if k.startswith('act_dead/')]
  return line[keys[-1]] if keys else None


def _setting(e) -> str:
  if e['init_std'] is not None:
    what = f'init normal std {e["init_std"]}'
  elif e['learning_rate'] == BASELINE_LR:
    what = f'baseline (He init, lr {BASELINE_LR})'
  else:
    what = f'lr {e["learning_rate"]}'
  fix = ('clip 1.0' if e['grad_clip_norm'] else
         'BN' if e['norm'] == 'batch' else '–')
  return what, fix


def analyse(folders, figdir, budget: str) -> str:
  entries = common.load(folders['plain'])
  rows = []
  for e in entries:
    what, fix = _setting(e)
    line = next((l for l in reversed(e.run.lines)
                 if 'nonfinite/first_step' in l), {}) if e.run else {}
    losses = [v for v in e.series('train/loss')[1]]
    rows.append([what, fix, e.status, e.steps(),
                 line.get('nonfinite/first_step', '–'),
                 line.get('nonfinite/first_grad_layer', '–'),
                 line.get('nonfinite/first_activation', '–'),
                 max((v for v in losses if v == v), default=None),
                 e.last('grad_norm/global'), _dead_top(e),
                 common.acc(e.last('eval/accuracy'))])
  fig, axes = common.plt.subplots(1, 2, figsize=(12, 4.2))
  styles = {'–': '-', 'clip 1.0': '--', 'BN': ':'}
  colours = {}
  for e in entries:
    what, fix = _setting(e)
    colour = colours.setdefault(what, common.COLOURS[len(colours)])
    label = f'{what}, {fix}' + (' (diverged)' if e.diverged else '')
    common.plot_curve(axes[0], e, 'train/loss', label, colour,
                      linestyle=styles[fix])
    common.plot_curve(axes[1], e, 'grad_norm/global', label, colour,
                      linestyle=styles[fix])
  for ax, title in zip(axes, ('training loss', 'global gradient L2 norm '
                              '(before clipping)')):
    ax.set_yscale('log')
    ax.set_xlabel('step')
    ax.set_title(title)
  axes[0].legend(fontsize=7)
  curves = common.save(fig, figdir, 'loss_and_gradient_norm')
  fig, ax = common.plt.subplots(figsize=(11, 4))
  for i, e in enumerate(entries):
    what, fix = _setting(e)
    if fix != '–' or e.run is None:
      continue
    first, last = e.first_line(), e.last_line()
    if not what.startswith('lr'):  # The lr runs share the baseline's init.
      common.plot_depth(ax, e, first, 'grad_norm',
                        f'{what}, step {first.get("step")}',
                        colours.get(what), linestyle=':')
    if last.get('step') != first.get('step'):
      zeros = sum(v == 0 for v in e.layer_values(last, 'grad_norm'))
      common.plot_depth(ax, e, last, 'grad_norm',
                        f'{what}, step {last.get("step")}'
                        + (f' ({zeros} layers exactly 0, not drawn)'
                           if zeros else ''),
                        colours.get(what))
  layers = max((e.layers for e in entries), key=len, default=[])
  common.depth_axis(ax, layers, every=2)
  ax.set_yscale('log')
  ax.set_ylabel('gradient L2 norm')
  ax.set_title('gradient norm per layer without a fix: at step 1 (dotted) '
               'and at the last logged step whose gradient is finite')
  ax.legend(fontsize=8)
  depth = common.save(fig, figdir, 'gradient_by_layer')
  return '\n\n'.join([
      common.table(['setting', 'fix', 'status', 'steps', 'first non-finite '
                    'step', 'first non-finite gradient', 'first non-finite '
                    'activation', 'largest logged loss', 'last finite grad '
                    'norm', 'dead units, top layer (last finite step)',
                    'test acc'],
                   rows),
      common.figure_link(curves, curves.stem),
      common.figure_link(depth, depth.stem)])

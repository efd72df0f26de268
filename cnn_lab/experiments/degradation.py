"""The degradation problem: plain and residual nets of 20 and 56 layers."""

from cnn_lab.experiments import Stage, common

TITLE = 'Degradation'
QUESTION = ('does the deeper plain net train worse than the shallower one, '
            'and do shortcuts (type A or B) undo it?')

STAGES = (
    Stage('resnets', 'resnets.py',
          cpu=('--config.model.width=0.5', '--config.train.batch_size=64',
               '--config.train.num_steps=300', '--config.log_every_steps=10',
               '--config.eval_every_steps=100',
               '--config.eval_num_examples=1000', '--parallel=2'),
          tiny=('--config.model.width=0.25',)),
)


def _label(e) -> str:
  if not e['residual']:
    return f'plain-{e["depth"]}'
  return f'ResNet-{e["depth"]} ({e["shortcut"]})'


def analyse(folders, figdir, budget: str) -> str:
  entries = common.load(folders['resnets'])
  rows = []
  for e in entries:
    first = e.layers[0] if e.layers else None
    rows.append([
        _label(e), common.num_params(e), e.status,
        common.late_mean(e, 'train/loss'),
        common.acc(common.late_mean(e, 'train/accuracy')),
        common.acc(e.last('eval/accuracy')),
        e.first_line().get(f'grad_norm/{first}'),
        common.late_mean(e, f'grad_norm/{first}')])
  fig, axes = common.plt.subplots(1, 2, figsize=(11, 4))
  for i, e in enumerate(entries):
    style = '--' if not e['residual'] else (
        '-' if e['shortcut'] == 'A' else ':')
    colour = common.COLOURS[0 if e['depth'] == 20 else 3]
    common.plot_curve(axes[0], e, 'train/loss', _label(e), colour, window=5,
                      linestyle=style)
    if e.layers:
      common.plot_curve(axes[1], e, f'grad_norm/{e.layers[0]}', _label(e),
                        colour, window=3, linestyle=style)
  axes[0].set_title('training loss (trailing mean of 5 logged steps)')
  axes[0].set_ylabel('training loss')
  axes[1].set_title('first convolution: gradient L2 norm')
  axes[1].set_yscale('log')
  for ax in axes:
    ax.set_xlabel('step')
    ax.legend(fontsize=8)
  curves = common.save(fig, figdir, 'training_loss_and_first_layer')
  fig, ax = common.plt.subplots(figsize=(11, 4))
  for i, e in enumerate(common.pick(entries, depth=56)):
    if e.run is not None:
      common.plot_depth(ax, e, e.first_line(), 'grad_norm',
                        f'{_label(e)}, step {e.first_line().get("step")}',
                        common.COLOURS[i])
  layers = max((e.layers for e in common.pick(entries, depth=56)), key=len,
               default=[])
  common.depth_axis(ax, layers, every=4)
  ax.set_yscale('log')
  ax.set_ylabel('gradient L2 norm')
  ax.set_title('56 layers at initialisation: gradient norm per layer')
  ax.legend(fontsize=8)
  depth = common.save(fig, figdir, 'gradient_by_layer_56')
  return '\n\n'.join([
      common.table(['network', 'params', 'status',
                    'train loss (last 20%)', 'train acc (last 20%)',
                    'test acc', 'first-layer grad, step 1',
                    'first-layer grad (last 20%)'], rows),
      common.figure_link(curves, curves.stem),
      common.figure_link(depth, depth.stem)])

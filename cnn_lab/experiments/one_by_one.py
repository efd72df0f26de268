"""1x1 convolutions and other design choices: NiN's mlpconv, GoogLeNet's
reductions, two 3x3 against one 5x5, global average pooling against a fully
connected head; parameter and FLOP tables, and accuracy at one budget."""

from cnn_lab.experiments import Stage, common

TITLE = '1x1 convolutions and architecture design'
QUESTION = ('what do NiN\'s 1x1 layers, Inception\'s 1x1 reductions, two '
            'stacked 3x3 convolutions and a global-average-pool head save in '
            'parameters and FLOPs, and what do they cost in accuracy?')

STAGES = (
    Stage('googlenet', 'googlenet.py',
          cpu=('--config.model.width=0.25', '--config.train.batch_size=64',
               '--config.train.num_steps=120', '--config.log_every_steps=10',
               '--config.eval_every_steps=60',
               '--config.eval_num_examples=1000', '--parallel=2'),
          tiny=('--config.model.width=0.0625',)),
)
# GoogLeNet as in the paper (5x5 fifth branch, LRN, dropout 0.4), at its
# ImageNet scale, without the auxiliary heads (training only).
PAPER = dict(name='googlenet_paper', num_classes=1000, aux_heads=False)
VARIANTS = (('the paper: 1x1 reductions, 5x5, GAP head', {}),
            ('no 1x1 reductions', {'reduction': False}),
            ('two stacked 3x3 for the 5x5', {'branch5': '3x3x2'}),
            ('fully connected head (flatten 7x7x1024)', {'head': 'fc'}))


def _summary(knobs, shape):
  from cnn_lab import models, summary  # Shapes only: no computation.
  return summary.summarize(models.create_model(**knobs), shape)


def _total(rows):
  return sum(r.params for r in rows), sum(r.macs for r in rows)


def _m(n):
  return f'{n / 1e6:.2f} M'


def _googlenet_table() -> str:
  base = None
  lines = []
  for what, knobs in VARIANTS:
    params, macs = _total(_summary({**PAPER, **knobs}, (224, 224, 3)))
    base = base or (params, macs)
    lines.append([what, _m(params), f'{macs / 1e9:.2f} G',
                  f'{params / base[0]:.2f}x', f'{macs / base[1]:.2f}x'])
  return common.table(['GoogLeNet at 224x224, 1000 classes', 'params',
                       'multiply-adds', 'params vs paper', 'MACs vs paper'],
                      lines)


def _module_table() -> str:
  """Inception 3a's branches with and without the reductions."""
  out = []
  for what, knobs in VARIANTS[:3]:
    rows = [r for r in _summary({**PAPER, **knobs}, (224, 224, 3))
            if r.name.startswith('inception3a')]
    for branch in ('branch2', 'branch3'):
      mine = [r for r in rows if f'/{branch}' in r.name or r.name.startswith(
          f'inception3a/{branch}')]
      params, macs = _total(mine)
      out.append([what, branch, ' + '.join(r.name.split('/', 1)[-1]
                                           for r in mine),
                  f'{params:,}', f'{macs / 1e6:.1f} M'])
  return common.table(['inception 3a (input 28x28x192)', 'branch', 'layers',
                       'params', 'multiply-adds'], out)


def _stacked_table() -> str:
  """One 5x5 against two 3x3 with the same C channels in and out, on one
  HxW map: the same receptive field, 25C^2 against 18C^2 weights."""
  out = []
  for c in (32, 64, 192):
    one = 25 * c * c + c
    two = 2 * (9 * c * c + c)
    out.append([c, f'{one:,}', f'{two:,}', f'{two / one:.2f}x'])
  return common.table(['channels C in and out', 'one 5x5', 'two 3x3',
                       'two 3x3 / one 5x5 (params and MACs)'], out)


def _nin_table() -> str:
  rows = _summary(dict(name='nin', num_classes=10), (32, 32, 3))
  out = []
  for block in ('mlpconv1', 'mlpconv2', 'mlpconv3'):
    mine = [r for r in rows if r.name.startswith(block)]
    spatial = [r for r in mine if r.name.endswith('conv1')]
    ones = [r for r in mine if not r.name.endswith('conv1')]
    out.append([block, f'{_total(spatial)[0]:,}', f'{_total(ones)[0]:,}',
                f'{_total(spatial)[1] / 1e6:.1f} M',
                f'{_total(ones)[1] / 1e6:.1f} M'])
  params, macs = _total(rows)
  last = rows[-2].output_shape  # The map before the class maps.
  fc = last[0] * last[1] * last[2] * 10 + 10
  out.append(['all', '', '', '', f'total {params:,} params, '
              f'{macs / 1e6:.0f} M MACs'])
  return (common.table(['NiN at 32x32x3, 10 classes', 'params of the kxk '
                        'conv', 'params of the two 1x1', 'MACs kxk',
                        'MACs 1x1'], out)
          + f'\n\nNiN\'s head is a 1x1 convolution to 10 class maps and '
          f'global average pooling (0 parameters); a fully connected layer '
          f'on its last {"x".join(map(str, last))} map instead would add '
          f'{fc:,} parameters ({fc / params:.0%} of the network).')


def _label(e) -> str:
  for field in ('reduction', 'branch5', 'head'):
    if e[field] is not None:
      return f'{field}={e[field]}'
  return e.name


def _trained_table(entries, figdir):
  rows = []
  for e in entries:
    rows.append([_label(e), common.num_params(e), e.status,
                 common.late_mean(e, 'train/loss'),
                 common.acc(common.late_mean(e, 'train/accuracy')),
                 common.acc(e.last('eval/accuracy'))])
  fig, ax = common.plt.subplots(figsize=(6.5, 4))
  for i, e in enumerate(entries):
    common.plot_curve(ax, e, 'train/loss', _label(e), common.COLOURS[i],
                      window=5)
  ax.set_xlabel('step')
  ax.set_ylabel('training loss (trailing mean of 5)')
  ax.set_title('GoogLeNet variants at one budget')
  ax.legend(fontsize=8)
  path = common.save(fig, figdir, 'googlenet_variants_loss')
  return (common.table(['variant', 'params (trained)', 'status',
                        'train loss (last 20%)', 'train acc (last 20%)',
                        'test acc'], rows) + '\n\n'
          + common.figure_link(path, path.stem))


def analyse(folders, figdir, budget: str) -> str:
  entries = common.load(folders['googlenet'])
  return '\n\n'.join([
      '**Counted** (`cnn_lab.summary`; multiply-adds of convolutions and '
      'dense layers for one image):', _googlenet_table(), _module_table(),
      _stacked_table(),
      _nin_table(), '**Trained**, every variant for the same number of '
      'steps:', _trained_table(entries, figdir)])

"""Dropout and the cost function: the stochastic training loss against the
deterministic probe loss, on LeNet-5 and AlexNet."""

import math
import statistics

from cnn_lab.experiments import Stage, common

TITLE = 'Dropout and the cost'
QUESTION = ('with dropout on, the training loss J is a different function at '
            'every step: how far does it sit from the deterministic cost, '
            'does the check (dropout off, J falls monotonically; then on) '
            'work, and what does each rate cost in test accuracy?')

STAGES = (
    Stage('lenet', 'lenet.py',
          cpu=('--config.train.num_steps=600', '--config.log_every_steps=10',
               '--config.eval_num_examples=2000', '--executor=inprocess'),
          tiny=('--config.model.width=0.5',)),
    Stage('alexnet', 'alexnet.py',
          cpu=('--config.model.width=0.25', '--config.train.batch_size=64',
               '--config.train.num_steps=600', '--config.log_every_steps=10',
               '--config.eval_num_examples=1000', '--parallel=2'),
          tiny=('--config.model.width=0.0625',)),
)


def _changes(values) -> list[float]:
  """The relative change from each logged value to the next (finite ones)."""
  return [(b - a) / abs(a) for a, b in zip(values, values[1:])
          if math.isfinite(a) and math.isfinite(b) and a]


def _noise(values) -> float | None:
  """Std of the step-to-step relative changes: how jumpy a curve is."""
  changes = _changes(values)
  return statistics.pstdev(changes) if len(changes) > 1 else None


def _rises(values) -> str:
  """'k of n': logged steps where the curve rose, by `check monotonic`."""
  return (f'{common.rises(values)} of {len(values) - 1}'
          if len(values) > 1 else '–')


def _largest_rise(values) -> float | None:
  """The largest relative rise from one logged step to the next: the
  tolerance `check monotonic` would need to pass the curve."""
  return max(_changes(values), default=None)


def _rows(entries):
  rows = []
  for e in entries:
    _, train = e.series('train/loss')
    _, probe = e.series('probe/loss')
    gap = [t - p for t, p in zip(train, probe)]
    tail = gap[-max(1, len(gap) // 5):]
    rows.append([
        e['dropout_rate'], e.status,
        common.late_mean(e, 'train/loss'), common.late_mean(e, 'probe/loss'),
        sum(tail) / len(tail) if tail else None,
        _rises(train), _rises(probe),
        _largest_rise(probe), _noise(train), _noise(probe),
        common.acc(common.late_mean(e, 'train/accuracy')),
        common.acc(e.last('eval/accuracy'))])
  return rows


def _curves(entries, figdir, stage, title):
  rates = [e['dropout_rate'] for e in entries]
  shown = [r for r in rates if r in (0.0, 0.5, 0.7)] or rates
  fig, axes = common.plt.subplots(1, len(shown), figsize=(4.5 * len(shown),
                                                          4), sharey=True,
                                  squeeze=False)
  for ax, rate in zip(axes[0], shown):
    e = common.one(entries, dropout_rate=rate)
    common.plot_curve(ax, e, 'train/loss', 'training loss J (dropout on)',
                      common.COLOURS[0], linewidth=0.8)
    common.plot_curve(ax, e, 'probe/loss', 'probe loss (fixed batch, '
                      'dropout off)', common.COLOURS[1])
    ax.set_yscale('log')
    ax.set_title(f'{title}, dropout {rate}')
    ax.set_xlabel('step')
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel('cross-entropy')
  return common.save(fig, figdir, f'{stage}_train_against_probe_loss')


def _accuracy(stages, figdir):
  fig, ax = common.plt.subplots(figsize=(5.5, 4))
  for i, (title, entries) in enumerate(stages):
    pts = sorted((e['dropout_rate'], e.last('eval/accuracy'))
                 for e in entries if e.last('eval/accuracy') is not None)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o',
            label=f'{title}, test', color=common.COLOURS[i])
    pts = sorted((e['dropout_rate'], common.late_mean(e, 'train/accuracy'))
                 for e in entries
                 if common.late_mean(e, 'train/accuracy') is not None)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='.',
            linestyle=':', label=f'{title}, train (dropout on)',
            color=common.COLOURS[i])
  ax.set_xlabel('dropout rate')
  ax.set_ylabel('accuracy')
  ax.set_title('accuracy against dropout rate')
  ax.legend(fontsize=8)
  return common.save(fig, figdir, 'accuracy_by_rate')


HEAD = ['rate', 'status', 'train loss J (last 20%)',
        'probe loss (last 20%)', 'J − probe (last 20%)', 'rises of J',
        'rises of probe', 'largest rise of probe', 'jumpiness of J',
        'jumpiness of probe',
        'train acc', 'test acc']


def analyse(folders, figdir, budget: str) -> str:
  parts, stages = [], []
  for stage, title in (('lenet', 'LeNet-5'), ('alexnet', 'AlexNet')):
    entries = common.load(folders[stage])
    stages.append((title, entries))
    fig = _curves(entries, figdir, stage, title)
    parts += [f'**{title}**:', common.table(HEAD, _rows(entries)),
              common.figure_link(fig, fig.stem)]
  fig = _accuracy(stages, figdir)
  parts += [
      '"Rises" counts the logged steps where the value went up by more than '
      '0.1% (the rule of `python -m cnn_lab.check monotonic`), out of the '
      'logged intervals; "largest rise" is the largest relative rise from '
      'one logged step to the next (the tolerance the check would need; '
      'negative where the curve only fell); '
      '"jumpiness" '
      'is the standard deviation of the relative change from one logged '
      'step to the next.', common.figure_link(fig, fig.stem)]
  return '\n\n'.join(parts)

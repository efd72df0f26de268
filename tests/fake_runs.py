"""Hand-written run folders with every statistic a run can log (the
contract of README's "What a run writes"), for plot and report tests that
need no training: zeros, non-finite values, batch norm, saturation."""

import json
import pathlib

WEIGHT_LAYERS = ('block1_conv1', 'block2_conv1', 'block3_conv1', 'fc1', 'fc2')
SITES = ('block1_act1', 'block2_act1', 'block3_act1', 'fc1_act')


def write_fake_run(workdir, *, name='fake', norm='none', activation='relu',
                   num_steps=20, log_every=2, nonfinite_step=None,
                   dead_from_step=None, torn_last_line=False):
  """Writes config.json, layers.json, activations.json and metrics.jsonl.

  Gradients shrink tenfold per layer towards the input; from
  `dead_from_step` on the first conv layer's gradient is exactly 0; from
  `nonfinite_step` on every gradient statistic is "nan".
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config = {'name': name, 'seed': 0,
            'model': {'name': 'vgg_fake', 'norm': norm,
                      'activation': activation},
            'train': {'num_steps': num_steps, 'batch_size': 8}}
  layers = []
  for n in WEIGHT_LAYERS:
    layers.append({'name': n, 'kind': 'dense' if n.startswith('fc')
                   else 'conv', 'num_params': 100})
    if norm == 'batch' and 'conv' in n:
      layers.append({'name': n.replace('conv', 'bn'), 'kind': 'norm',
                     'num_params': 16})
  bn_layers = [l['name'] for l in layers if l['kind'] == 'norm']
  (workdir / 'config.json').write_text(json.dumps(config))
  (workdir / 'layers.json').write_text(json.dumps(layers))
  (workdir / 'activations.json').write_text(json.dumps(
      [{'name': s, 'activation': activation} for s in SITES]))
  lines = []
  for step in range(log_every, num_steps + 1, log_every):
    t = step / num_steps
    line = {'step': step, 'train/loss': 2.3 * (1 - 0.5 * t),
            'train/accuracy': 0.1 + 0.5 * t,
            'train/learning_rate': 0.01, 'probe/loss': 2.2 * (1 - 0.5 * t)}
    bad = nonfinite_step is not None and step >= nonfinite_step
    for depth, n in enumerate(l['name'] for l in layers):
      g = 10.0 ** (depth - len(layers)) * (1 + t)
      if dead_from_step is not None and step >= dead_from_step and depth == 0:
        g = 0.0
      for key, value in (('grad_norm', g), ('grad_mean_abs', g / 30),
                         ('grad_max_abs', g / 3), ('param_norm', 5.0),
                         ('update_ratio', g / 5.0 * 1e-2)):
        line[f'{key}/{n}'] = 'nan' if bad else value
    for i, s in enumerate(SITES):
      line[f'act_mean/{s}'] = 0.1 * (i + 1) * (1 + t)
      line[f'act_std/{s}'] = 0.5 / (i + 1)
      kind = 'act_dead' if activation == 'relu' else 'act_saturated'
      line[f'{kind}/{s}'] = min(1.0, 0.1 * i + 0.3 * t)
    for i, b in enumerate(bn_layers):
      line[f'bn_mean_gap/{b}'] = 0.5 * (1 - t) / (i + 1) + 0.01
      line[f'bn_var_gap/{b}'] = (1 - t) / (i + 1) + 0.02
    if norm == 'batch':
      line['probe/eval_mode_loss'] = line['probe/loss'] + 0.3 * (1 - t)
      line['probe/bn_train_eval_gap'] = 0.3 * (1 - t)
    if bad:
      line['train/loss'] = 'nan'
      line['nonfinite/first_step'] = nonfinite_step
      line['nonfinite/first_grad_layer'] = layers[-1]['name']
    lines.append(json.dumps(line))
    if step % 10 == 0 or step == num_steps:
      lines.append(json.dumps({'step': step, 'eval/loss': 2.0 * (1 - 0.4 * t),
                               'eval/accuracy': 0.1 + 0.4 * t}))
  text = '\n'.join(lines) + '\n'
  if torn_last_line:  # A crash in the middle of writing a line.
    text += lines[-2][:40]
  (workdir / 'metrics.jsonl').write_text(text)
  return workdir

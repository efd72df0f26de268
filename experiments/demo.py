r"""The README's main job: VGG16 with and without batch norm on Fashion-MNIST,
a short CPU budget each, then both compared: figures on shared layer axes
and one HTML report.

  .venv/bin/python experiments/demo.py [--steps=120] [--out=runs/demo]

Each run is the config file's experiment (configs/vgg16_nobn.py and
configs/vgg16_bn.py differ only in model.norm) shortened by the same
overrides, so the two runs differ in batch norm alone.
"""

import argparse
import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == '__main__':
  # Before JAX starts: the allocator launch.py runs on (cnn_lab/malloc.py).
  from cnn_lab.malloc import reexec_with_fast_malloc  # noqa: E402
  reexec_with_fast_malloc()

from configs import vgg16_bn, vgg16_nobn  # noqa: E402
from cnn_lab import plots, report  # noqa: E402
from cnn_lab.train import train_and_evaluate  # noqa: E402


def shorten(config, steps: int):
  """The CPU budget: fewer, smaller steps and a 2,000-image test subset."""
  config.train.num_steps = steps
  config.train.batch_size = 64
  # Adam reaches a readable accuracy in this budget where the paper's SGD
  # schedule (meant for ~30 epochs) would not; both runs get the same.
  config.optim.name = 'adam'
  config.optim.learning_rate = 1e-3
  config.optim.weight_decay = 0.0
  config.optim.schedule = 'constant'
  config.log_every_steps = 10
  config.histogram_every_steps = 60  # TensorBoard histograms, 3 times.
  config.eval_every_steps = 0  # Evaluate once, at the end.
  config.eval_num_examples = 2000
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=120)
  parser.add_argument('--out', default=str(ROOT / 'runs' / 'demo'))
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  if out.exists():  # The demo owns this folder; start it afresh.
    shutil.rmtree(out)
  start = time.time()
  results = {}
  for module in (vgg16_nobn, vgg16_bn):
    config = shorten(module.get_config(), args.steps)
    results[config.name] = train_and_evaluate(config, out / config.name)
  workdirs = [out / name for name in results]
  figure = plots.plot_compare(workdirs, out / 'compare.png')
  figures = plots.plot_comparisons(workdirs, out / 'compare')
  page = report.write_report(workdirs, out / 'report.html')
  print(f'\nDemo finished in {(time.time() - start) / 60:.1f} min.')
  for name, result in results.items():
    print(f'  {name:<11} test accuracy (first 2,000 test images): '
          f'{result["eval/accuracy"]:.4f}   metrics: '
          f'{out / name / "metrics.jsonl"}')
  print(f'  summary figure:  {figure}')
  print(f'  comparisons:     {len(figures)} figures in {out / "compare"}')
  print(f'  report:          {page} (open in a browser)')
  print(f'  per-run plots:   {out}/*/plots/*.png')


if __name__ == '__main__':
  main()

"""cnn_lab.plots and cnn_lab.report: every figure and the HTML page for two
short real runs (VGG16 without and with batch norm on Fashion-MNIST), for
hand-written runs with every statistic (exact zeros, nan, batch norm, a torn
last line, an older run), bad input, and the page as headless Chromium
renders it."""

import base64
import html.parser
import io
import json
import pathlib
import re
import shutil
import subprocess
import sys

import matplotlib.image
import matplotlib.pyplot
import numpy as np
import pytest

from cnn_lab import plots, report
from cnn_lab import runs as runs_lib
from fake_runs import write_fake_run

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # The configs package lives at the root.
  sys.path.insert(0, str(ROOT))

BASE_FIGURES = {'gradient_flow', 'grad_heatmap', 'curves', 'update_ratio'}
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def short_config(module):
  """The config file's experiment, shortened to a few seconds on a CPU."""
  config = module.get_config()
  config.model.width = 0.125
  config.train.num_steps = 6
  config.train.batch_size = 16
  config.log_every_steps = 2
  config.eval_every_steps = 0
  config.eval_num_examples = 100
  config.data.dataset = 'fashion_mnist'
  return config


@pytest.fixture(scope='module')
def real_runs(tmp_path_factory):
  """VGG16 without and with batch norm (configs/vgg16_{nobn,bn}.py), 6 steps
  each; the two configs differ in model.norm only."""
  from configs import vgg16_bn, vgg16_nobn
  from cnn_lab.train import train_and_evaluate
  base = tmp_path_factory.mktemp('runs')
  workdirs = []
  for module in (vgg16_nobn, vgg16_bn):
    config = short_config(module)
    train_and_evaluate(config, base / config.name)
    workdirs.append(base / config.name)
  return workdirs


@pytest.fixture(scope='module')
def real_report(real_runs, tmp_path_factory):
  out = tmp_path_factory.mktemp('report') / 'report.html'
  assert report.write_report(real_runs, out) == out
  return out


@pytest.fixture(scope='module')
def fake_runs(tmp_path_factory):
  """ReLU without BN (first layer dead from step 10), tanh with BN, and a
  run whose gradients turn nan at step 12 and whose last line is torn."""
  base = tmp_path_factory.mktemp('fake')
  return {
      'relu': write_fake_run(base / 'relu', name='relu_nobn',
                             dead_from_step=10),
      'tanh_bn': write_fake_run(base / 'tanh_bn', name='tanh_bn',
                                norm='batch', activation='tanh'),
      'nan': write_fake_run(base / 'nan', name='nan_run', nonfinite_step=12,
                            torn_last_line=True),
  }


def read_rgb(path_or_file) -> np.ndarray:
  return matplotlib.image.imread(path_or_file)[..., :3].astype(float)


def colour_pixels(rgb: np.ndarray) -> int:
  """Pixels of plot colours: saturated, not grey, black or white."""
  return int(((rgb.max(-1) - rgb.min(-1)) > 0.3).sum())


def assert_real_figure(path):
  """A readable PNG of a real figure: large, not one colour, with lines or
  bars in colour and dark text."""
  rgb = read_rgb(path)
  assert rgb.shape[0] > 300 and rgb.shape[1] > 600, (path, rgb.shape)
  assert rgb.std() > 0.05, path
  assert colour_pixels(rgb) > 500, path
  assert (rgb.max(-1) < 0.3).sum() > 500, path  # Axis labels, ticks.


def expected_figures(workdir) -> set[str]:
  """What a run of the current train loop logs: activation statistics for
  every model, batch-norm statistics for models with batch norm."""
  config = json.loads((workdir / 'config.json').read_text())
  names = BASE_FIGURES | {'activations'}
  return names | ({'bn'} if config['model']['norm'] == 'batch' else set())


# --- Real runs. ---


def test_real_runs_log_what_the_figures_need(real_runs):
  for workdir in real_runs:
    run = runs_lib.RunFiles(workdir)
    line = run.train_lines()[-1]
    assert (workdir / 'activations.json').exists()
    for key in ('probe/loss', 'act_mean/', 'act_std/', 'act_dead/',
                'grad_mean_abs/', 'grad_max_abs/', 'update_ratio/'):
      assert any(k.startswith(key) for k in line), key
  bn = runs_lib.RunFiles(real_runs[1])
  assert bn.bn_layers and bn.last('probe/bn_train_eval_gap') is not None


def test_plot_run_writes_every_figure(real_runs):
  for workdir in real_runs:
    paths = plots.plot_run(workdir)
    assert all(p.parent == workdir / 'plots' for p in paths)
    assert {p.stem for p in paths} == expected_figures(workdir)
    for path in paths:
      assert_real_figure(path)


def test_plot_comparisons_on_shared_axes(real_runs, tmp_path):
  paths = plots.plot_comparisons(real_runs, tmp_path / 'cmp')
  assert {p.stem for p in paths} == expected_figures(real_runs[1])
  for path in paths:
    assert_real_figure(path)
  runs = [runs_lib.RunFiles(w) for w in real_runs]
  assert runs_lib.differing_fields(runs) == ['model.norm']
  assert plots.legend_labels(runs) == ['norm=none', 'norm=batch']
  # The heatmap has one panel per run: twice as wide as one run's.
  one = read_rgb(real_runs[0] / 'plots' / 'grad_heatmap.png')
  two = read_rgb(tmp_path / 'cmp' / 'grad_heatmap.png')
  assert two.shape[1] > 1.6 * one.shape[1] - 400


class PageParser(html.parser.HTMLParser):
  """The <img> sources, every tag name, and the text of the page."""

  def __init__(self):
    super().__init__()
    self.srcs, self.tags, self.text = [], [], []

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    attrs = dict(attrs)
    if tag == 'img':
      self.srcs.append(attrs.get('src', ''))
    for name in ('href', 'src'):
      value = attrs.get(name) or ''
      assert value.startswith('data:') or not value, (tag, value[:80])

  def handle_data(self, data):
    self.text.append(data)


def parse_page(path) -> PageParser:
  parser = PageParser()
  parser.feed(pathlib.Path(path).read_text(encoding='utf-8'))
  return parser


def test_report_is_self_contained_with_every_figure(real_runs, real_report):
  page = parse_page(real_report)
  text = ' '.join(' '.join(page.text).split())
  assert 'script' not in page.tags and 'link' not in page.tags
  assert 'http' not in real_report.read_text()  # No external resource.
  # Both runs, the one field that differs, its two values.
  assert 'vgg16_nobn' in text and 'vgg16_bn' in text
  assert 'model.norm none batch' in text
  # One embedded PNG per figure, each a real figure.
  assert len(page.srcs) == len(expected_figures(real_runs[1]))
  for src in page.srcs:
    prefix = 'data:image/png;base64,'
    assert src.startswith(prefix)
    png = base64.b64decode(src[len(prefix):], validate=True)
    assert png.startswith(PNG_SIGNATURE)
    assert_real_figure(io.BytesIO(png))
  assert page.tags.count('figcaption') == len(page.srcs)
  for name in expected_figures(real_runs[1]):
    assert report.CAPTIONS[name] in text


def test_report_final_metrics_match_the_runs(real_runs, real_report):
  text = ' '.join(' '.join(parse_page(real_report).text).split())
  runs = [runs_lib.RunFiles(w) for w in real_runs]
  rows = dict(report.final_metrics(runs))
  assert rows['steps run'] == ['6 of 6', '6 of 6']
  for key, title in (('eval/accuracy', 'eval accuracy (last)'),
                     ('train/loss', 'train loss (last)'),
                     ('probe/loss', 'probe loss (last)')):
    values = []
    for workdir in real_runs:  # The file itself, not the report's reader.
      lines = [json.loads(t) for t in open(workdir / 'metrics.jsonl')]
      values.append(float([l for l in lines if key in l][-1][key]))
    assert rows[title] == pytest.approx(values)
    cells = ' '.join(report.format_value(v) for v in values)
    assert f'{title} {cells}' in text
  gap = rows['BN: probe loss, eval minus train mode (last)']
  assert gap[0] is None and np.isfinite(gap[1])
  assert 'non-finite values started' not in rows


# --- Hand-written runs: the statistics a short real run rarely shows. ---


def drawn_figures(workdirs) -> set[str]:
  """The figures that have data for these runs (drawn, not saved)."""
  runs = [runs_lib.RunFiles(w) for w in workdirs]
  names = set()
  for name, draw in plots.FIGURES.items():
    fig = draw(runs, plots.legend_labels(runs))
    if fig is not None:
      names.add(name)
      matplotlib.pyplot.close(fig)
  return names


def test_fake_runs_draw_every_figure_they_have_data_for(fake_runs):
  for key, workdir in fake_runs.items():
    extra = {'bn'} if key == 'tanh_bn' else set()
    assert drawn_figures([workdir]) == BASE_FIGURES | {'activations'} | extra


def magenta_pixels(rgb) -> int:
  return int(((rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.1)
              & (rgb[..., 2] > 0.9)).sum())


def test_heatmap_marks_nonfinite_and_zero_cells(fake_runs, tmp_path):
  """nan cells are magenta, exact zeros black; a clean run has neither."""
  heat = {}
  for key in ('tanh_bn', 'nan', 'relu'):
    run = runs_lib.RunFiles(fake_runs[key])
    fig = plots.figure_grad_heatmap([run], [run.name])
    fig.savefig(tmp_path / f'{key}.png', dpi=plots.DPI)
    heat[key] = read_rgb(tmp_path / f'{key}.png')
  assert magenta_pixels(heat['tanh_bn']) == 0
  assert magenta_pixels(heat['relu']) < 300  # At most the colour bar's tip.
  assert magenta_pixels(heat['nan']) > 20000  # Half the cells: steps 12-20.
  black = {k: int((v.max(-1) < 0.05).sum()) for k, v in heat.items()}
  assert black['relu'] > black['tanh_bn'] + 5000  # block1_conv1 from step 10.


def test_merge_order_keeps_forward_order():
  assert runs_lib.merge_order([['a', 'b', 'd'], ['a', 'c', 'd', 'e']]) == [
      'a', 'b', 'c', 'd', 'e']
  assert runs_lib.merge_order([['x'], []]) == ['x']
  # ResNet against its plain twin: the shortcut sits where it belongs.
  assert runs_lib.merge_order([['c1', 'c2', 'fc'], ['c1', 'c2', 'sc', 'fc']]) \
      == ['c1', 'c2', 'sc', 'fc']


def test_report_on_crashed_and_older_runs(fake_runs, tmp_path):
  """A run with nan gradients and a torn last line, and an older run with
  gradient norms only: the report names the first non-finite layer, draws
  what it can and says what it could not."""
  old = shutil.copytree(fake_runs['relu'], tmp_path / 'old')
  (old / 'activations.json').unlink()
  keep = ('step', 'train/', 'eval/', 'grad_norm/')
  lines = [json.loads(l) for l in (old / 'metrics.jsonl').open()]
  (old / 'metrics.jsonl').write_text(''.join(
      json.dumps({k: v for k, v in l.items() if k.startswith(keep)}) + '\n'
      for l in lines))
  assert drawn_figures([old]) == {'gradient_flow', 'grad_heatmap', 'curves'}
  out = report.write_report([fake_runs['nan'], old], tmp_path / 'r.html')
  page = parse_page(out)
  text = ' '.join(' '.join(page.text).split())
  assert 'non-finite values started step 12: backward at fc2 –' in text
  assert 'Not drawn: bn' in text
  assert len(page.srcs) == 5


def test_report_on_a_norm_overflow_names_no_layer(fake_runs, tmp_path):
  # Finite gradients that overflow the global norm are recorded at a step
  # but at no layer or activation: the report says so.
  run = shutil.copytree(fake_runs['nan'], tmp_path / 'overflow')
  lines = [json.loads(l) for l in (run / 'metrics.jsonl').open()
           if l.strip().endswith('}')]
  (run / 'metrics.jsonl').write_text(''.join(
      json.dumps({k: v for k, v in l.items()
                  if k != 'nonfinite/first_grad_layer'}) + '\n'
      for l in lines))
  page = parse_page(report.write_report([run], tmp_path / 'r.html'))
  text = ' '.join(' '.join(page.text).split())
  assert ('non-finite values started step 12: global gradient norm '
          'overflowed') in text


def test_report_of_a_single_run(fake_runs, tmp_path):
  out = report.write_report([fake_runs['tanh_bn']], tmp_path / 'one.html')
  page = parse_page(out)
  text = ' '.join(' '.join(page.text).split())
  assert 'cnn_lab report: tanh_bn' in text
  assert 'model.norm batch' in text  # The whole config, one column.
  assert len(page.srcs) == 6


# --- Command lines and bad input. ---


def run_module(*args):
  return subprocess.run([sys.executable, '-m', *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=300)


def test_report_command_line(fake_runs, tmp_path):
  out = tmp_path / 'sub' / 'report.html'
  proc = run_module('cnn_lab.report', str(fake_runs['relu']),
                    str(fake_runs['tanh_bn']), '--out', str(out))
  assert proc.returncode == 0, proc.stderr
  assert '[report] wrote' in proc.stdout and out.exists()
  assert 'Traceback' not in proc.stderr


def test_plots_command_line(fake_runs, tmp_path):
  proc = run_module('cnn_lab.plots', 'compare', str(fake_runs['relu']),
                    str(fake_runs['nan']), '--out', str(tmp_path / 'figs'))
  assert proc.returncode == 0, proc.stderr
  assert sorted(pathlib.Path(l).stem for l in proc.stdout.split()) == sorted(
      BASE_FIGURES | {'activations'})


@pytest.mark.parametrize('module', ['cnn_lab.report', 'cnn_lab.plots'])
@pytest.mark.parametrize('case', ['not_a_run', 'no_training_lines',
                                  'broken_config', 'no_arguments'])
def test_bad_input_is_one_error_line(module, case, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  if case != 'not_a_run':
    (workdir / 'config.json').write_text(
        '{"name": ' if case == 'broken_config' else '{"name": "x"}')
    (workdir / 'layers.json').write_text('[]')
    (workdir / 'metrics.jsonl').write_text(
        '{"step": 5, "eval/loss": 2.3, "eval/accuracy": 0.1}\n')
  args = [] if case == 'no_arguments' else [str(workdir)]
  if module == 'cnn_lab.plots':
    args = ['run', *args]
  proc = run_module(module, *args, '--out', str(tmp_path / 'out.html'))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  expected = {'not_a_run': 'is not a cnn_lab run',
              'no_training_lines': 'has no training lines',
              'broken_config': 'is not valid JSON',
              'no_arguments': 'required'}[case]
  assert expected in lines[0]
  assert not (tmp_path / 'out.html').exists()


# --- The page as a browser shows it. ---


@pytest.fixture(scope='module')
def chromium():
  path = shutil.which('chromium')
  if path is None:
    pytest.fail('chromium is not installed; run `bash setup.sh` (it '
                "installs Debian's chromium package)")
  return path


def screenshot(chromium, page, out, tmp_path) -> np.ndarray:
  """The top 3000 pixels of `page` rendered 1200 pixels wide."""
  proc = subprocess.run(
      [chromium, '--headless', '--no-sandbox', '--disable-gpu',
       '--hide-scrollbars', f'--user-data-dir={tmp_path / "profile"}',
       f'--screenshot={out}', '--window-size=1200,3000',
       pathlib.Path(page).as_uri()],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and out.exists(), proc.stderr[-2000:]
  return read_rgb(out)


def test_chromium_renders_the_figures(chromium, real_report, tmp_path):
  good = screenshot(chromium, real_report, tmp_path / 'good.png', tmp_path)
  # Negative control: the same page with every image's PNG header
  # destroyed shows broken images in the same places.
  broken = tmp_path / 'broken.html'
  broken.write_text(re.sub(r'(data:image/png;base64,)[A-Za-z0-9+/]{16}',
                           r'\1' + 'A' * 16, real_report.read_text()))
  bad = screenshot(chromium, broken, tmp_path / 'bad.png', tmp_path)
  assert good.shape == bad.shape == (3000, 1200, 3)
  # Both pages have their text (dark pixels); only the good one has plots.
  assert (good.max(-1) < 0.3).sum() > 5000
  assert (bad.max(-1) < 0.3).sum() > 5000
  # Broken images show only Chromium's small broken-image icon.
  assert colour_pixels(good) > 100_000, colour_pixels(good)
  assert colour_pixels(bad) < 1000, colour_pixels(bad)
  # Chromium's DOM holds the title and every figure.
  proc = subprocess.run(
      [chromium, '--headless', '--no-sandbox', '--disable-gpu',
       f'--user-data-dir={tmp_path / "profile"}', '--dump-dom',
       real_report.as_uri()], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '<h1>cnn_lab report: vgg16_nobn, vgg16_bn</h1>' in proc.stdout
  assert proc.stdout.count('<img src="data:image/png;base64,') == \
      real_report.read_text().count('<img ')

"""`python -m cnn_lab.bench`: its FLOP count against a hand count, the
alternating timer, the files it writes (numbers consistent with each other)
and its one-line errors."""

import json
import statistics
import subprocess
import sys
import types

import pytest

from cnn_lab import models, xla_flags
from cnn_lab.bench import suite


def test_lenet5_train_flops_match_hand_count():
  # LeNet-5 at 28x28x1 (conv1 pads by 2): multiply-accumulates per image.
  conv1 = 28 * 28 * 6 * (5 * 5 * 1)
  conv2 = 10 * 10 * 16 * (5 * 5 * 6)
  dense = 400 * 120 + 120 * 84 + 84 * 10
  model = models.create_model(name='lenet5', num_classes=10)
  assert suite.train_flops_per_image(model, (28, 28, 1)) == 6 * (
      conv1 + conv2 + dense)


@pytest.fixture
def clock(monkeypatch):
  """The timer's clock, advanced by the fake steps below instead of their
  sleeping: no stall of a busy machine can stretch a step."""
  now = [0.0]
  monkeypatch.setattr(suite, 'time', types.SimpleNamespace(
      perf_counter=lambda: now[0]))

  def advance(seconds):
    now[0] += seconds
  return advance


def test_time_alternating_reverses_order_and_takes_medians(clock):
  calls = []

  def sleeper(label, seconds):
    # The first step after the other variant ran is 0.1 s slower, as a
    # framework's first step after another framework's is.
    def run(n):
      switched = not calls or calls[-1][0] != label
      calls.append((label, n))
      clock(seconds * n + 0.1 * switched)
    return run

  runs = {'a': sleeper('a', 0.01), 'b': sleeper('b', 0.03)}
  times = suite.time_alternating(runs, rounds=3, min_seconds=0.06)
  warm, rounds = calls[:4], calls[4:]
  assert warm == [('a', 1), ('a', 1), ('b', 1), ('b', 1)]
  # Every timing follows one untimed step of the same variant.
  assert rounds[::2] == [(label, 1) for label in 'abbaab']
  timed = rounds[1::2]
  assert [label for label, _ in timed] == ['a', 'b', 'b', 'a', 'a', 'b']
  # n is sized from the second warm step so that one timing lasts
  # ~min_seconds.
  assert dict(timed[:2]) == {'a': 6, 'b': 2}
  # Per-step seconds, not per timing, without the slow first steps.
  assert times['a'] == pytest.approx(0.01) and times['b'] == pytest.approx(
      0.03)


def test_time_rounds_gives_one_time_per_round(clock):
  # Seconds each call of a variant takes per step: two warm steps, then
  # per round an untimed step (0 here) and the timed one (n = 1: every step
  # is longer than min_seconds).
  sleeps = {'a': [0.03, 0.03, 0, 0.05, 0, 0.01, 0, 0.02],
            'b': [0.02, 0.02, 0, 0.04, 0, 0.06, 0, 0.08]}
  calls = {'a': 0, 'b': 0}

  def runner(label):
    def run(n):
      clock(sleeps[label][calls[label]] * n)
      calls[label] += 1
    return run

  times = suite.time_rounds({label: runner(label) for label in 'ab'},
                            rounds=3, min_seconds=0.001)
  assert calls == {'a': 8, 'b': 8}
  for label in 'ab':
    timed = sleeps[label][3::2]
    assert len(times[label]) == 3
    assert times[label] == pytest.approx(timed)


def run_bench(*args):
  return subprocess.run(
      [sys.executable, '-m', 'cnn_lab.bench', *args],
      capture_output=True, text=True, timeout=600)


def test_writes_consistent_table_and_json(tmp_path):
  args = ['--models=lenet5', '--batch_size=16', '--rounds=3',
          '--min_seconds=0.05', '--no-pipeline', f'--out={tmp_path}']
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    args.append('--vs-torch')
  except ImportError:
    pass
  proc = run_bench(*args)
  assert proc.returncode == 0, proc.stderr
  doc = json.loads((tmp_path / 'bench.json').read_text())
  (r,) = doc['results']
  assert r['model'] == 'lenet5' and r['batch'] == 16
  assert r['params'] == 61_706
  off_s = r['ms_per_step']['off'] / 1e3
  assert r['images_per_second'] == pytest.approx(16 / off_s)
  assert r['gflops'] == pytest.approx(r['train_flops_per_image'] * 16 / off_s
                                      / 1e9)
  assert r['fraction_of_matmul_peak'] == pytest.approx(
      r['gflops'] / doc['header']['matmul_peak_gflops'])
  assert r['stats_cost'] == pytest.approx(
      r['ms_per_step']['on'] / r['ms_per_step']['off'])
  assert r['compile_seconds']['off'] > 0 and r['peak_mib_xla_estimate']['off'] > 0
  table = (tmp_path / 'bench.md').read_text()
  row = next(line for line in table.splitlines()
             if line.startswith('| lenet5 |'))
  assert f'**{r["images_per_second"]:,.0f}**' in row
  assert table in proc.stdout
  # The process ran with cnn_lab's XLA flags, and the table says so.
  assert xla_flags.EIGEN_CONVOLUTIONS in doc['header']['xla_flags']
  assert f'XLA_FLAGS={doc["header"]["xla_flags"]};' in table
  if '--vs-torch' in args:
    t = r['torch']
    assert t['params'] == r['params']
    assert t['format'] in ('channels_last', 'contiguous')
    best = min(t['ms_per_step'].values())
    assert t['ms_per_step'][t['format']] == best
    assert r['ratio_vs_torch'] == pytest.approx(best / r['ms_per_step']['off'])
    # One ratio per round, of that round's two timings; the medians are
    # the medians of the rounds.
    rounds = r['ms_per_round']
    assert len(r['ratio_per_round']) == len(rounds['cnn_lab']) == 3
    for i, ratio in enumerate(r['ratio_per_round']):
      assert ratio == pytest.approx(rounds[f'torch {t["format"]}'][i]
                                    / rounds['cnn_lab'][i])
    assert r['ms_per_step']['off'] == pytest.approx(
        statistics.median(rounds['cnn_lab']))
    assert (f'**{r["ratio_vs_torch"]:.2f}** '
            f'({min(r["ratio_per_round"]):.2f}-'
            f'{max(r["ratio_per_round"]):.2f})') in row


@pytest.mark.parametrize('flag, message', [
    ('--models=lenet5,alexnet9', 'unknown alexnet9'),
    ('--batch_size=0', '--batch_size=0 must be at least 1'),
    ('--dtype=float16', "invalid choice: 'float16'"),
    ('--min_seconds=-1', '--min_seconds=-1.0 must be positive'),
])
def test_bad_flags_one_line_exit_2(flag, message, tmp_path):
  proc = run_bench(flag, f'--out={tmp_path}')
  assert proc.returncode == 2
  assert proc.stderr.count('\n') == 1 and message in proc.stderr
  assert not (tmp_path / 'bench.json').exists()


def test_unwritable_out_one_line_exit_2(tmp_path):
  (tmp_path / 'file').write_text('')
  proc = run_bench('--models=lenet5', f'--out={tmp_path}/file/sub')
  assert proc.returncode == 2
  assert proc.stderr.count('\n') == 1 and 'cannot write there' in proc.stderr

"""Everything a run writes into its workdir, in one place.

  config.json     the whole resolved config (written atomically)
  layers.json     the parameterised layers in forward order, with their kind
                  and parameter count (what plots use as the depth axis)
  activations.json  the activation sites in forward order, with their
                  function (the axis of activation plots)
  metrics.jsonl   one JSON object per line: training lines every
                  `log_every_steps`, evaluation lines every `eval_every_steps`
  tensorboard/    the same scalars as TensorBoard event files (clu), and
                  histograms every `histogram_every_steps`
  plots/          PNG figures drawn from the files above
"""

import json
import math
import os
import pathlib
from typing import Any, Mapping

import numpy as np


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  """Writes JSON to a temporary file in the same folder, then renames it."""
  path = pathlib.Path(path)
  tmp = path.with_name(f'.{path.name}.tmp')
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
    f.write('\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _to_json_number(value):
  value = float(np.asarray(value))
  # JSON has no NaN/Infinity; keep them readable by Python's json module.
  return value if math.isfinite(value) else str(value)


class MetricsWriter:
  """Appends metric lines to metrics.jsonl and to TensorBoard.

  Keys keep the order of `key_order` (forward order for per-layer keys);
  each line is flushed as it is written, so a crash leaves a readable file.
  """

  def __init__(self, workdir: pathlib.Path, key_order=()):
    self.workdir = pathlib.Path(workdir)
    self.key_order = {k: i for i, k in enumerate(key_order)}
    self._file = open(self.workdir / 'metrics.jsonl', 'a')
    from clu import metric_writers  # Pulls in TensorFlow; only when writing.
    self._tb = metric_writers.SummaryWriter(str(self.workdir / 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, Any]) -> dict:
    """One line. Python ints stay ints (a step number); strings (a layer's
    name) go to metrics.jsonl only."""
    keys = sorted(scalars, key=lambda k: (self.key_order.get(k, 1e9), k))
    line = {'step': int(step)}
    line.update({k: scalars[k] if isinstance(scalars[k], (str, int))
                 else _to_json_number(scalars[k]) for k in keys})
    self._file.write(json.dumps(line) + '\n')
    self._file.flush()
    self._tb.write_scalars(int(step), {
        k: float(np.asarray(scalars[k])) for k in keys
        if not isinstance(scalars[k], str)})
    return line

  def write_histograms(self, step: int, arrays: Mapping[str, Any]) -> None:
    """TensorBoard histograms (clu), e.g. `grads/<layer>`,
    `activations/<site>`; non-finite entries are left out of each."""
    finite = {}
    for key, value in arrays.items():
      value = np.asarray(value, np.float32).ravel()
      finite[key] = value[np.isfinite(value)]
    self._tb.write_histograms(int(step), finite)

  def flush(self):
    self._file.flush()
    self._tb.flush()

  def close(self):
    self._file.close()
    self._tb.close()


def read_metrics(workdir) -> list[dict]:
  """The lines of `<workdir>/metrics.jsonl`; a torn last line is ignored."""
  lines = []
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  with open(path) as f:
    for text in f:
      try:
        lines.append(json.loads(text))
      except json.JSONDecodeError:
        break
  return lines


def truncate_metrics(workdir, last_step: int) -> int:
  """Keeps the lines of `<workdir>/metrics.jsonl` up to `last_step` (and
  drops a torn last line), rewriting the file atomically; returns how many
  lines were kept. Resuming from the checkpoint of `last_step` then writes
  every later line exactly once."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return 0
  kept = [l for l in read_metrics(workdir)
          if isinstance(l, dict) and l.get('step', 0) <= last_step]
  tmp = path.with_name(f'.{path.name}.tmp')
  with open(tmp, 'w') as f:
    for line in kept:
      f.write(json.dumps(line) + '\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return len(kept)

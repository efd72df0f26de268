"""A run folder as files: what the plots and the report read.

`RunFiles` reads one workdir (config.json, layers.json, activations.json,
metrics.jsonl) without importing anything of the training code, so it works
on any finished, crashed or older run; the helpers below line several runs
up (a merged layer order, the config fields that differ, labels made of
them).
"""

import json
import math
import pathlib

from cnn_lab.errors import ConfigError
from cnn_lab.writers import read_metrics

WEIGHT_KINDS = ('conv', 'dense')


def to_float(value) -> float:
  """A logged number as a float: "nan"/"inf" strings parse, anything that is
  not a number (a layer name, null) is nan."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


class RunFiles:
  """What one workdir holds: config, layers and activation sites (forward
  order), metric lines."""

  def __init__(self, workdir):
    self.workdir = pathlib.Path(workdir)
    for name in ('config.json', 'layers.json', 'metrics.jsonl'):
      if not (self.workdir / name).is_file():
        raise ConfigError(
            f'{self.workdir} is not a cnn_lab run: it has no {name}')
    self.config = self._read_json('config.json', dict)
    self.layers = [l for l in self._read_json('layers.json', list)
                   if isinstance(l, dict) and 'name' in l]
    # Older runs have no activations.json: their sites come from the keys.
    self.activations = []
    if (self.workdir / 'activations.json').is_file():
      self.activations = [a for a in self._read_json('activations.json', list)
                          if isinstance(a, dict) and 'name' in a]
    try:
      lines = read_metrics(self.workdir)
    except UnicodeDecodeError as e:
      raise ConfigError(f'{self.workdir / "metrics.jsonl"} is not text: {e}')
    self.lines = [l for l in lines
                  if isinstance(l, dict) and isinstance(l.get('step'), int)]

  def _read_json(self, name, kind):
    try:
      obj = json.loads((self.workdir / name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConfigError(f'{self.workdir / name} is not valid JSON: {e}')
    if not isinstance(obj, kind):
      raise ConfigError(f'{self.workdir / name} does not hold a JSON '
                        f'{"object" if kind is dict else "list"}')
    return obj

  @property
  def name(self) -> str:
    return str(self.config.get('name') or self.workdir.name)

  @property
  def weight_layers(self) -> list[str]:
    """Convolution and dense layers: the depth axis of gradient-flow plots."""
    return [l['name'] for l in self.layers if l.get('kind') in WEIGHT_KINDS]

  def _names_in_keys(self, prefixes) -> list[str]:
    """Names after `prefix/` in the training lines, in the order logged."""
    names = {}
    for line in self.train_lines():
      for key in line:
        prefix, _, name = key.partition('/')
        if prefix in prefixes and name:
          names.setdefault(name)
    return list(names)

  @property
  def bn_layers(self) -> list[str]:
    """Layers with running-statistics gaps logged, in forward order."""
    logged = self._names_in_keys(('bn_mean_gap', 'bn_var_gap'))
    order = [l['name'] for l in self.layers]
    return merge_order([[n for n in order if n in logged], logged])

  @property
  def sites(self) -> list[str]:
    """Activation sites in forward order (activations.json, else the keys)."""
    logged = self._names_in_keys(
        ('act_mean', 'act_std', 'act_saturated', 'act_dead'))
    return merge_order([[a['name'] for a in self.activations], logged])

  def train_lines(self) -> list[dict]:
    return [l for l in self.lines if 'train/loss' in l]

  def series(self, key: str) -> tuple[list[int], list[float]]:
    pairs = [(l['step'], to_float(l[key])) for l in self.lines if key in l]
    return [p[0] for p in pairs], [p[1] for p in pairs]

  def last(self, key: str):
    """The last logged value of `key` (as written), or None."""
    for line in reversed(self.lines):
      if key in line:
        return line[key]
    return None

  def has(self, prefix: str) -> bool:
    return any(k.startswith(prefix) for l in self.train_lines() for k in l)


def load_runs(workdirs) -> list[RunFiles]:
  """The runs, each checked to have at least one training line."""
  if not workdirs:
    raise ConfigError('no run folders given')
  runs = [RunFiles(w) for w in workdirs]
  for run in runs:
    if not run.train_lines():
      raise ConfigError(f'{run.workdir} has no training lines in '
                        'metrics.jsonl yet (did the run log a step?)')
  return runs


def trailing_mean(steps, values, window: int) -> tuple[list, list]:
  """Each finite value averaged with the finite ones before it, up to
  `window` in all (a noisy mini-batch curve smoothed without looking
  ahead); non-finite values are dropped."""
  kept = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
  means = []
  for i in range(len(kept)):
    recent = [v for _, v in kept[max(0, i - window + 1):i + 1]]
    means.append(sum(recent) / len(recent))
  return [s for s, _ in kept], means


def merge_order(name_lists) -> list[str]:
  """The union of several forward-ordered name lists: a name new to the
  merged list goes after the name before it in its own list."""
  merged = []
  for names in name_lists:
    names = list(names)
    pos = 0
    for name in names:
      if name in merged:
        pos = merged.index(name) + 1
        continue
      # Past names only other lists have (another branch), so that the
      # earlier lists keep their order.
      while pos < len(merged) and merged[pos] not in names:
        pos += 1
      merged.insert(pos, name)
      pos += 1
  return merged


def flatten_config(d: dict, prefix='') -> dict:
  """A nested config as {"model.norm": value, ...}."""
  flat = {}
  for k, v in d.items():
    if isinstance(v, dict):
      flat.update(flatten_config(v, f'{prefix}{k}.'))
    else:
      flat[f'{prefix}{k}'] = v
  return flat


def differing_fields(runs: list[RunFiles]) -> list[str]:
  """Dotted config fields whose values differ between the runs (not name)."""
  return differing_config_fields([r.config for r in runs])


def differing_config_fields(configs: list[dict]) -> list[str]:
  """Dotted fields whose values differ between the configs (not name)."""
  flats = [flatten_config(c) for c in configs]
  keys = sorted(set().union(*flats))
  return [k for k in keys
          if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1
          and k != 'name']


def run_labels(runs: list[RunFiles]) -> list[str]:
  """Legend labels: the config fields whose values differ between runs
  (by their last name, e.g. `norm=batch`, unless two share it)."""
  flats = [flatten_config(r.config) for r in runs]
  differing = differing_fields(runs)
  short = [k.split('.')[-1] for k in differing]
  names = [s if short.count(s) == 1 else k for k, s in zip(differing, short)]
  labels = []
  for run, flat in zip(runs, flats):
    parts = [f'{n}={flat.get(k)}' for n, k in zip(names, differing)]
    labels.append(', '.join(parts) if parts else run.workdir.name)
  if len(set(labels)) < len(labels):  # Same config twice: use the folders.
    labels = [f'{l} ({r.workdir.name})' for l, r in zip(labels, runs)]
  return labels

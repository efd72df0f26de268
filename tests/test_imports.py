"""The import graph of cnn_lab: data flows one way (../shared/STYLE.md).

Read from the source with `ast`, so that imports inside functions count as
much as those at the top: no module of cnn_lab imports one that imports it
back, directly or through others; files (plots, report, check) read run
folders without the training code; the blocks do not reach the statistics.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'cnn_lab'


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def module_files() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def imports_of(path: pathlib.Path, modules) -> set[str]:
  """The cnn_lab modules that `path` names in any import statement. `from
  pkg import name` counts as importing `pkg.name` where that is a module,
  else `pkg`."""
  this = module_name(path)
  package = this if path.name == '__init__.py' else this.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')
        anchor = anchor[:len(anchor) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      for alias in node.names:
        sub = f'{base}.{alias.name}'
        found.add(sub if sub in modules else base)
  return {m for m in found if m in modules and m != this}


def import_graph(parents: bool = False) -> dict[str, set[str]]:
  """Module -> the modules it imports; with `parents`, also the packages
  above it, whose __init__ runs first when it is imported."""
  modules = module_files()
  graph = {m: imports_of(p, modules) for m, p in modules.items()}
  if parents:
    for m in graph:
      parts = m.split('.')
      graph[m] |= {'.'.join(parts[:i]) for i in range(1, len(parts))} - {m}
  return graph


def reachable(graph, start) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for nxt in graph[todo.pop()]:
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_the_graph_is_read_from_the_source():
  graph = import_graph()
  # Spot checks that the parser sees top-level, function-level and
  # `from package import module` imports.
  assert 'cnn_lab.kernels.select' in graph['cnn_lab.kernels']
  assert 'cnn_lab.kernels.onednn' in graph['cnn_lab.kernels.select']
  assert 'cnn_lab.data.sources' in graph['cnn_lab.data.prepare']  # In main.
  assert {'cnn_lab.layers', 'cnn_lab.kernels'} <= reachable(
      graph, 'cnn_lab.train')


def test_no_module_imports_one_that_imports_it_back():
  graph = import_graph()
  loops = sorted(f'{m} -> {n} -> ... -> {m}' for m in graph
                 for n in graph[m] if m in reachable(graph, n) | {n})
  assert not loops, loops


@pytest.mark.parametrize('module,forbidden', [
    # Figures and reports read the files a run wrote, never live objects.
    ('cnn_lab.plots', {'cnn_lab.train', 'cnn_lab.steps', 'cnn_lab.models'}),
    ('cnn_lab.report', {'cnn_lab.train', 'cnn_lab.steps', 'cnn_lab.models'}),
    ('cnn_lab.check', {'cnn_lab.train', 'cnn_lab.models'}),
    # The blocks and their kernels know nothing of statistics or training.
    ('cnn_lab.layers', {'cnn_lab.metrics', 'cnn_lab.train', 'cnn_lab.steps'}),
    ('cnn_lab.kernels', {'cnn_lab.layers', 'cnn_lab.metrics',
                         'cnn_lab.models'}),
    ('cnn_lab.models', {'cnn_lab.metrics', 'cnn_lab.train'}),
])
def test_data_flows_one_way(module, forbidden):
  # Counting the package __init__ files that importing a module runs.
  assert not reachable(import_graph(parents=True), module) & forbidden


def test_layers_reach_the_kernels_through_the_package_only():
  # One public surface: conv2d, max_pool and batch_norm_train.
  graph = import_graph()
  assert {m for m in graph['cnn_lab.layers']
          if m.startswith('cnn_lab.kernels')} == {'cnn_lab.kernels'}


def test_layers_hold_no_kernel_code():
  # Custom gradients and hand-made convolutions live in cnn_lab/kernels.
  source = (PACKAGE / 'layers.py').read_text()
  for kernel_code in ('custom_vjp', 'custom_jvp', 'conv_general_dilated',
                      'dot_general', 'ffi_call', 'defvjp'):
    assert kernel_code not in source, kernel_code

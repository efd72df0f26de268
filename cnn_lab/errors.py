"""The one exception type that means "the user asked for something invalid".

`launch.py` turns it into a single line on stderr and exit status 2; anything
else that escapes is a bug and keeps its traceback.
"""

import argparse
import math
import sys


class ConfigError(ValueError):
  """A config field, flag or input that cannot work; the message names it."""


def check_choice(field: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(
        f'{field}={value!r} is not allowed; choose one of '
        f'{", ".join(repr(a) for a in allowed)}')


def check_positive(field: str, value, *, integer: bool = False) -> None:
  kind = int if integer else (int, float)
  ok = (isinstance(value, kind) and not isinstance(value, bool)
        and math.isfinite(value) and value > 0)
  if not ok:
    what = 'a positive integer' if integer else 'a positive finite number'
    raise ConfigError(f'{field}={value!r} is not allowed; it must be {what}')


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one `error: ...` line and exit 2 (the
  command-line tools of cnn_lab: plots, report, check, summary)."""

  def error(self, message):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)

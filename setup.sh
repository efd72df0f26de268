#!/usr/bin/env bash
# One-time, idempotent set-up for a fresh Debian machine with Python 3.11:
#  1. Debian's dataset-fashion-mnist package (the offline default dataset);
#  2. a virtualenv in .venv with cnn_lab and its pinned dependencies;
#  3. TFDS's fashion_mnist prepared from Debian's files, checksums verified.
# Re-running it when all is done takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")"

if ! dpkg-query -W -f='${Status}' dataset-fashion-mnist 2>/dev/null \
    | grep -q 'install ok installed'; then
  echo '[setup] installing Debian package dataset-fashion-mnist'
  sudo=''
  [ "$(id -u)" = 0 ] || sudo='sudo'
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
    dataset-fashion-mnist >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  $python -m venv .venv
fi

# Reinstall only when the package metadata changed.
stamp=".venv/.cnn_lab-installed-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo '[setup] installing cnn_lab and its dependencies into .venv (a few minutes the first time)'
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.cnn_lab-installed-*
  touch "$stamp"
fi

.venv/bin/python -m cnn_lab.data.prepare

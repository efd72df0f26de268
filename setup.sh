#!/usr/bin/env bash
# One-time, idempotent set-up for a fresh Debian machine with Python 3.11:
#  1. Debian's dataset-fashion-mnist package (the offline default dataset),
#     chromium (the report test renders HTML in headless Chromium), g++
#     (to build the oneDNN convolution handlers) and libtcmalloc-minimal4
#     (the allocator the entry points run on, cnn_lab/malloc.py);
#  2. a virtualenv in .venv with cnn_lab, its pinned dependencies and the
#     test extra (pytest; torch==2.13.0, CPU build, for the benchmark;
#     submitit, whose local executor the sweep tests run);
#  3. cnn_lab's oneDNN convolutions compiled (cnn_lab/kernels/onednn.py);
#  4. TFDS's fashion_mnist prepared from Debian's files, checksums verified.
# Re-running it when all is done takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")"

# Debian packages: the offline dataset, and Chromium for the test that
# renders the HTML report headless. One apt-get run, only for what is missing.
missing=''
for pkg in dataset-fashion-mnist chromium g++ libtcmalloc-minimal4; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null \
      | grep -q 'install ok installed'; then
    missing="$missing $pkg"
  fi
done
if [ -n "$missing" ]; then
  echo "[setup] installing Debian package(s):$missing"
  sudo=''
  [ "$(id -u)" = 0 ] || sudo='sudo'
  $sudo apt-get update -qq
  # shellcheck disable=SC2086  # One word per package.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing \
    >/dev/null
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

# The oneDNN handlers (seconds; skipped once built for this source). Where
# they cannot be built the layers keep XLA's paths, only slower.
if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
  .venv/bin/python -m cnn_lab.kernels \
    || echo '[setup] continuing without oneDNN convolutions (slower on the CPU)'
fi

.venv/bin/python -m cnn_lab.data.prepare

#!/usr/bin/env bash
# The accelerator check of the benchmark: ResNet-50 at 224x224 and VGG16-BN
# at 32x32, bfloat16 then float32, cnn_lab against PyTorch on the same GPU,
# about 3-4 minutes of device time. It installs nothing from the network.
#
# Here (with network), once: fetch the one package the device image lacks
# (ml_collections; JAX, Flax, Optax, absl and PyTorch are there) as a wheel:
#   bash experiments/gpu_bench.sh prepare
# There (the repository's root, `.whl` carried along):
#   bash experiments/gpu_bench.sh
# Tables go to $OUT (the device tool's output folder) or runs/bench_gpu.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null \
    || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp -d .whl ml_collections==1.1.0
  ls .whl
  exit 0
fi

if compgen -G '.whl/*.whl' > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
out="${OUT:-runs/bench_gpu}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import jax, flax, optax, torch; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "torch", torch.__version__)'
for dtype in bfloat16 float32; do
  timeout 200 python3 -m cnn_lab.bench --models=resnet50,vgg16_bn \
    --resnet50_batch=128 --batch_size=128 --dtype="$dtype" --rounds=3 \
    --min_seconds=0.5 --vs-torch --no-pipeline --out="$out/$dtype" \
    || echo "bench $dtype failed with status $?"
done

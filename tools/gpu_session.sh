#!/usr/bin/env bash
# GPU evidence in one command, for a session that is lent the device machine (DEVELOPERS.md).
#
#   bash tools/gpu_session.sh tests bench short     # any subset, in this order; writes under $OUT
#
#   tests  the fast path's tests on the GPU: Triton kernels vs nn.Conv2d (float32 and bfloat16,
#          batch up to 512) and the batch augmentation vs torchvision     (~1-2 min, mostly compiling)
#   bench  train_cifar.py --benchmark at the design-card config (ConvMixer-256/8 k9 p1, batch 512):
#          plain vs fast whole step, model only, augmentation only, one depthwise layer
#   short  a real CIFAR-10 run for the trainer issue: ConvMixer-256/8 k5 p2, 25 epochs, batch 512
#          (the official CIFAR-10 script's setting); needs ./data (see below)
#
# CIFAR-10 on the device takes two calls (bash ../shared/cifar10/stage.sh here first):
#   call 1, carry [".cifar10/a"]:  mkdir -p /tmp/c && cp .cifar10/a/* /tmp/c/
#   call 2, carry [".cifar10/b"]:  python3 .cifar10/b/unpack.py data --src .cifar10 /tmp/c && bash tools/gpu_session.sh ...
# If pytest is missing there: `pip download pytest -d .wheels` here and add ".wheels" to carry.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
{ nvidia-smi; python -c "import torch, torchvision, triton; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
status=0
for step in "$@"; do
    start=$(date +%s)
    case "$step" in
    tests)
        python -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .wheels pytest
        timeout 300 python -m pytest -q -rs -k "fast_depthwise or batch_augment or randaugment or resized_crop" \
            test_convmixer.py > "$OUT/pytest_gpu.txt" 2>&1 || status=1 ;;
    bench)
        timeout 300 python train_cifar.py --hdim 256 --depth 8 --ksize 9 --batch-size 512 --benchmark \
            --out "$OUT/bench" > "$OUT/bench.txt" 2>&1 || status=1 ;;
    short)
        timeout 420 python train_cifar.py --hdim 256 --depth 8 --ksize 5 --psize 2 --epochs 25 \
            --batch-size 512 --data data --out "$OUT/convmixer_256_8_k5_p2_25ep" \
            > "$OUT/short_console.txt" 2>&1 || status=1 ;;
    *)
        echo "unknown step $step (tests, bench, short)"; exit 2 ;;
    esac
    echo "$step: $(( $(date +%s) - start )) s, status so far $status" | tee -a "$OUT/steps.txt"
done
exit $status

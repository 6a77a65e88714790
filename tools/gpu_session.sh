#!/usr/bin/env bash
# GPU evidence in one command, for a session that is lent the device machine (DEVELOPERS.md).
#
#   bash tools/gpu_session.sh tests bench short     # any subset, in this order; writes under $OUT
#
#   tests  the fast path's tests on the GPU: Triton kernels vs nn.Conv2d (float32 and bfloat16,
#          batch up to 512), under torch.compile, and the batch augmentation vs torchvision
#   bench  train_cifar.py --benchmark at the design-card config (ConvMixer-256/8 k9 p1, batch 512),
#          eager and with --compile: plain vs fast whole step, model only (with and without the
#          per-step host sync), augmentation only, the top kernels of a profiled step, one
#          depthwise layer per algorithm ($OUT/bench*/benchmark.json, console in bench.txt)
#   short  a real CIFAR-10 run for the trainer issue: ConvMixer-256/8 k5 p2, 25 epochs, batch 512
#          (the official CIFAR-10 script's setting), --fast; needs ./data (see below)
#   main   the main job, python train_cifar.py --hdim 256 --depth 8 --ksize 9 $MAIN_FLAGS, into
#          $OUT/${RUN_NAME:-cifar10_convmixer_256_8_k9_p1} (console in main_console.txt); needs
#          ./data. Alone in its call: it has to end inside the 600 s command limit. Stopped at
#          585 s, it saves last.pt (kept then, for --resume; deleted after a complete run).
#          A recipe trial for the default: MAIN_FLAGS="--val 5000 ..." RUN_NAME=val_<what>.
#
# Budget (15 device minutes a session, 600 s a command): "tests bench" needs no CIFAR-10 (synthetic
# images) and fits one call (its timeouts add up to 560 s); "short" and "main" need the data and
# a call each, so one session does tests + bench, a later one the main job.
# No GPU is needed to check that the kernels compile for an H100: python tools/check_kernels.py.
#
# CIFAR-10 on the device takes two calls (bash ../shared/cifar10/stage.sh here first):
#   call 1, carry [".cifar10/a"]:  mkdir -p /tmp/c && cp .cifar10/a/* /tmp/c/
#   call 2, carry [".cifar10/b"]:  python3 .cifar10/b/unpack.py data --src .cifar10 /tmp/c && bash tools/gpu_session.sh ...
# data/ is git-ignored, so it stays on the device for later calls while the machine is warm.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
# At most 8 files come back from $OUT (two folders deep): "tests bench short" writes 8, "main" 4.
{ nvidia-smi -L; python -c "import torch, torchvision, triton; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'triton', triton.__version__)"; } >> "$OUT/steps.txt" 2>&1
status=0
for step in "$@"; do
    start=$(date +%s)
    case "$step" in
    tests)
        timeout 200 python -m pytest -q -rs -k "(fast_depthwise or depthwise_breakdown or batch_augment or randaugment or resized_crop) and not h100" \
            test_convmixer.py > "$OUT/pytest_gpu.txt" 2>&1 || status=1 ;;
    bench)
        for compile in "" "--compile"; do     # at most 150 s eager, 210 s compiled
            timeout $([ -z "$compile" ] && echo 150 || echo 210) python train_cifar.py --hdim 256 --depth 8 --ksize 9 --batch-size 512 --benchmark \
                $compile --out "$OUT/bench${compile:+_compile}" >> "$OUT/bench.txt" 2>&1 || status=1
        done ;;
    short)
        timeout 420 python train_cifar.py --hdim 256 --depth 8 --ksize 5 --psize 2 --epochs 25 \
            --batch-size 512 --fast --data data --out "$OUT/short" > "$OUT/short_console.txt" 2>&1 \
            && rm -f "$OUT/short/last.pt" || status=1 ;;
    main)
        # shellcheck disable=SC2086  # MAIN_FLAGS is a list of flags
        timeout --signal=TERM 585 python train_cifar.py --hdim 256 --depth 8 --ksize 9 ${MAIN_FLAGS:-} \
            --data data --out "$OUT/${RUN_NAME:-cifar10_convmixer_256_8_k9_p1}" 2>&1 | tee "$OUT/main_console.txt" \
            && rm -f "$OUT/${RUN_NAME:-cifar10_convmixer_256_8_k9_p1}/last.pt" || status=1 ;;
    *)
        echo "unknown step $step (tests, bench, short, main)"; exit 2 ;;
    esac
    echo "$step: $(( $(date +%s) - start )) s, status so far $status" | tee -a "$OUT/steps.txt"
done
exit $status

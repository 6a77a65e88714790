#!/usr/bin/env bash
# The checks of the project that need an NVIDIA GPU, with their output in one folder.
#
#   bash tools/gpu_check.sh OUT_DIR tests bench     # any of: tests bench short main, in this order
#
#   tests  the fast path's tests on the GPU: Triton kernels vs nn.Conv2d (float32 and bfloat16,
#          batch up to 512), under torch.compile, and the batch augmentation vs the CPU path
#          (OUT_DIR/pytest_gpu.txt; about 5 minutes on an H200)
#   bench  train_cifar.py --benchmark for ConvMixer-256/8 k9 p1 at batch 512, eager and with
#          --compile: plain vs fast whole step, model only, augmentation only, a profiled step,
#          one depthwise layer per algorithm (OUT_DIR/bench*/benchmark.json, console in bench.txt)
#   short  a real CIFAR-10 run: ConvMixer-256/8 k5 p2, 25 epochs, batch 512, --fast (OUT_DIR/short)
#   main   the main job, train_cifar.py --hdim 256 --depth 8 --ksize 9 $MAIN_FLAGS, into
#          OUT_DIR/${RUN_NAME:-cifar10_convmixer_256_8_k9_p1}; with MAIN_SECONDS set, it is stopped
#          (SIGTERM) after that many seconds and saves last.pt: continue it with the same command,
#          which resumes the run. A recipe trial: MAIN_FLAGS="--val 5000 ..." RUN_NAME=val_<what>.
#
# "tests" and "bench" use synthetic images; "short" and "main" need CIFAR-10 in ./data (downloaded
# there on first use). No GPU is needed to check that the kernels compile for an H100:
# python fast/check_kernels.py.
set -uo pipefail
export PYTHONUNBUFFERED=1
[ $# -ge 1 ] || { echo "usage: bash tools/gpu_check.sh OUT_DIR [tests] [bench] [short] [main]"; exit 2; }
out_dir=$1; shift
mkdir -p "$out_dir" || exit 2
{ nvidia-smi -L; python -c "import torch, torchvision, triton; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'triton', triton.__version__)"; } >> "$out_dir/steps.txt" 2>&1
status=0
for step in "$@"; do
    start=$(date +%s)
    case "$step" in
    tests)
        timeout 900 python -m pytest -q -rs --durations=10 -k "fast_depthwise or depthwise_breakdown or batch_augment or batched or resized_crop or cuda_only" \
            test_convmixer.py > "$out_dir/pytest_gpu.txt" 2>&1 || status=1 ;;
    bench)
        for compile in "" "--compile"; do
            timeout 300 python train_cifar.py --hdim 256 --depth 8 --ksize 9 --batch-size 512 --benchmark \
                $compile --out "$out_dir/bench${compile:+_compile}" >> "$out_dir/bench.txt" 2>&1 || status=1
        done ;;
    short)
        python train_cifar.py --hdim 256 --depth 8 --ksize 5 --psize 2 --epochs 25 --batch-size 512 \
            --fast --data data --out "$out_dir/short" > "$out_dir/short_console.txt" 2>&1 \
            && rm -f "$out_dir/short/last.pt" || status=1 ;;
    main)
        run="$out_dir/${RUN_NAME:-cifar10_convmixer_256_8_k9_p1}"
        if grep -qs '"final": true' "$run/log.jsonl"; then     # complete (stopped just after its end)
            rm -f "$run/last.pt"; echo "main: $run is complete"; continue
        fi
        resume=(); [ -f "$run/last.pt" ] && resume=(--resume)
        limit=(); [ -n "${MAIN_SECONDS:-}" ] && limit=(timeout --signal=TERM "$MAIN_SECONDS")
        # shellcheck disable=SC2086  # MAIN_FLAGS is a list of flags
        "${limit[@]}" python train_cifar.py --hdim 256 --depth 8 --ksize 9 ${MAIN_FLAGS:-} "${resume[@]}" \
            --data data --out "$run" 2>&1 | tee -a "$out_dir/main_console.txt"
        [ "${PIPESTATUS[0]}" -eq 0 ] && rm -f "$run/last.pt" || status=1 ;;
    *)
        echo "unknown step $step (tests, bench, short, main)"; exit 2 ;;
    esac
    echo "$step: $(( $(date +%s) - start )) s, status so far $status" | tee -a "$out_dir/steps.txt"
done
exit $status

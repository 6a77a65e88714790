#!/usr/bin/env bash
# The checks of the project that need an NVIDIA GPU, with their output in one folder.
#
#   bash tools/gpu_check.sh OUT_DIR tests bench grid     # any of the steps below, in this order
#
# What waits for a GPU, in order of value per minute (CIFAR-10 in ./data for all but tests, bench):
#   bash tools/gpu_check.sh OUT_DIR tests bench grid
#   SEED_FLAGS="<the grid's best trial>" bash tools/gpu_check.sh OUT_DIR seeds short_float16
#   bash tools/gpu_check.sh OUT_DIR main          (then again, until it is complete)
#   bash tools/gpu_check.sh OUT_DIR variants      (then again, until it is complete)
#
#   tests  the GPU tests of what training runs: the Triton kernels vs nn.Conv2d at the main job's
#          shapes and at the widest kernels the trainer allows, their check, the batch augmentation
#          on CUDA vs the CPU, the CUDA graph step vs the eager one, and a float16 run with loss
#          scaling against a bfloat16 one (OUT_DIR/pytest_gpu.txt). GPU_TESTS=all: every test.
#   bench  python fast/benchmark.py for ConvMixer-256/8 k9 p1 at batch 64 and 512, plain and fast,
#          each step's profile (OUT_DIR/bench/benchmark.json, console in bench.txt).
#   grid   the short recipe's trials, each on a hold-out of 5,000 training images (--val 5000; the
#          test set chooses nothing): GRID lists name:flags pairs (default below), a comma between
#          two flags; each run into OUT_DIR/grid_NAME, its val_acc printed: that decides.
#   seeds  the chosen short recipe on all 50,000 training images, reported on the test set, once per
#          seed in SEEDS (default "0 1 2"): --recipe short $SEED_FLAGS into OUT_DIR/short_recipe_seedN.
#   short_float16  the short recipe in the precision of older GPUs (float16, loss scaling, the plain
#          path), forced on this one (OUT_DIR/short_float16).
#   main   the main job, train_cifar.py --hdim 256 --depth 8 --ksize 9 --seed ${SEED:-0}, into
#          OUT_DIR/${RUN_NAME:-cifar10_convmixer_256_8_k9_p1_seed0}. A run already there, or else
#          committed under results/ with that name, is continued (--resume). With MAIN_SECONDS set
#          it is stopped (SIGTERM) after that many seconds, keeping its last whole epoch in last.pt.
#   variants  the tutorial's comparisons at full scale, python tools/variants.py for VARIANTS_MINUTES
#          (default 8) into OUT_DIR/tutorial_variants, continuing what results/tutorial_variants holds;
#          new runs take the short recipe with SEED_FLAGS, as seeds does.
#
# "tests" and "bench" use synthetic images. No GPU is needed to check that the kernels compile for
# an H100 (or, with --arch, another NVIDIA GPU): python fast/check_kernels.py.
set -uo pipefail
export PYTHONUNBUFFERED=1
[ $# -ge 1 ] || { echo "usage: bash tools/gpu_check.sh OUT_DIR [tests] [bench] [grid] [seeds] [short_float16] [main] [variants]"; exit 2; }
out_dir=$1; shift
mkdir -p "$out_dir" || exit 2
{ nvidia-smi -L; python -c "import torch, torchvision, triton; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'triton', triton.__version__)"; } >> "$out_dir/steps.txt" 2>&1
status=0
for step in "$@"; do
    start=$(date +%s)
    case "$step" in
    tests)
        selection="cuda_only or (fast_depthwise and not compile_for_an_h100 and not float32) or (matches_conv2d_float32 and (32-32-9 or 16-16-31 or 32-32-63)) or check_against_conv2d"
        [ "${GPU_TESTS:-}" = all ] && selection="not nothing"
        # -m "": slow tests too (pytest.ini's default leaves them out)
        timeout 900 python -m pytest -q -m "" -rs --durations=15 -k "$selection" \
            tests > "$out_dir/pytest_gpu.txt" 2>&1 || status=1 ;;
    bench)
        timeout 500 python fast/benchmark.py --hdim 256 --depth 8 --ksize 9 --batch-sizes 64 512 \
            --out "$out_dir/bench" >> "$out_dir/bench.txt" 2>&1 || status=1 ;;
    grid)
        # name:flags; the first is --recipe short unchanged
        grid=${GRID:-"official: lr0.02:--lr=0.02 ra6:--ra-m=6 mix:--mixup=0.2,--cutmix=0.2"}
        for trial in $grid; do
            [[ $trial == *:* ]] || { echo "GRID: $trial is not name:flags"; status=1; continue; }
            name=${trial%%:*}; flags=${trial#*:}
            # shellcheck disable=SC2086  # the flags: a comma between two, = between a flag and its value
            python train_cifar.py --recipe short --val 5000 ${flags//,/ } --data data \
                --out "$out_dir/grid_$name" > "$out_dir/grid_$name.txt" 2>&1 || status=1
            python -c "import json, sys; r = json.loads(open(sys.argv[1]).read().splitlines()[-1]); \
print(sys.argv[2], 'val_acc', r.get('val_acc'))" "$out_dir/grid_$name/log.jsonl" "$name" || status=1
            rm -f "$out_dir/grid_$name/last.pt" "$out_dir/grid_$name/model.pt"
        done ;;
    seeds)
        for seed in ${SEEDS:-0 1 2}; do
            # shellcheck disable=SC2086  # SEED_FLAGS is a list of flags
            python train_cifar.py --recipe short ${SEED_FLAGS:-} --seed "$seed" --data data \
                --out "$out_dir/short_recipe_seed$seed" > "$out_dir/short_recipe_seed$seed.txt" 2>&1 \
                && rm -f "$out_dir/short_recipe_seed$seed/last.pt" || status=1
            tail -1 "$out_dir/short_recipe_seed$seed.txt"
        done ;;
    short_float16)
        python train_cifar.py --recipe short --no-fast --amp-dtype float16 --data data \
            --out "$out_dir/short_float16" > "$out_dir/short_float16.txt" 2>&1 \
            && rm -f "$out_dir/short_float16/last.pt" || status=1 ;;
    main)
        name=${RUN_NAME:-cifar10_convmixer_256_8_k9_p1_seed${SEED:-0}}
        run="$out_dir/$name"
        if [ ! -e "$run" ] && [ -d "results/$name" ]; then   # continue the run committed here
            cp -r "results/$name" "$run" && echo "main: continuing results/$name in $run"
        fi
        if grep -qs '"final": true' "$run/log.jsonl"; then
            echo "main: $run is complete"; continue
        fi
        recipe=(--hdim 256 --depth 8 --ksize 9 --seed "${SEED:-0}"); [ -f "$run/last.pt" ] && recipe=(--resume)
        limit=()
        [ -n "${MAIN_SECONDS:-}" ] && limit=(timeout --preserve-status --signal=TERM --kill-after=60 "$MAIN_SECONDS")
        # -X faulthandler: a crash (segfault, abort) leaves the Python stack of every thread.
        "${limit[@]}" python -X faulthandler train_cifar.py "${recipe[@]}" --data data --out "$run" 2>&1 \
            | tee -a "$out_dir/${name}_console.txt"
        code=${PIPESTATUS[0]}
        echo "main: train_cifar.py exited with status $code" | tee -a "$out_dir/${name}_console.txt"
        [ "$code" -eq 0 ] || status=1 ;;
    variants)
        if [ ! -e "$out_dir/tutorial_variants" ] && [ -d results/tutorial_variants ]; then
            cp -r results/tutorial_variants "$out_dir/" && echo "variants: continuing results/tutorial_variants"
        fi
        # shellcheck disable=SC2086  # SEED_FLAGS (the grid's best trial) is a list of flags
        python tools/variants.py --data data --minutes "${VARIANTS_MINUTES:-8}" \
            --out "$out_dir/tutorial_variants" ${SEED_FLAGS:+-- $SEED_FLAGS} 2>&1 | tee -a "$out_dir/variants.txt"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    *)
        echo "unknown step $step (tests, bench, grid, seeds, short_float16, main, variants)"; exit 2 ;;
    esac
    echo "$step: $(( $(date +%s) - start )) s, status so far $status" | tee -a "$out_dir/steps.txt"
done
exit $status

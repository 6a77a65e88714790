#!/usr/bin/env bash
# The checks of the project that need an NVIDIA GPU, with their output in one folder.
#
#   bash tools/gpu_check.sh OUT_DIR tests bench grid sigterm   # any of the steps below, in this order
#
# What waits for a GPU, in order of value per minute (CIFAR-10 in ./data for grid and seeds):
#   BENCH_RUNS="bench bench_fused_norm" bash tools/gpu_check.sh OUT_DIR tests bench grid sigterm
#   SHORT_FLAGS="--no-fast --amp-dtype float16" SHORT_NAME=short_float16 bash tools/gpu_check.sh OUT_DIR short
#   SEED_FLAGS="<the grid's best trial>" bash tools/gpu_check.sh OUT_DIR seeds
#
#   tests  the GPU tests of what the training path runs: the Triton kernels vs nn.Conv2d on its
#          32 x 32 planes (k 9 and 8, 256 channels, batch 1, 64 and 512 in bfloat16; k 9 in
#          float32; partial stacks of planes), the fused GELU -> BatchNorm (--fused-norm) vs the
#          pair in bfloat16 (batch 64 with the skip connection, 512) and in its CPU tests' shapes
#          (float32, float16, in a ConvMixer), the batch augmentation on CUDA vs the CPU, the device
#          step and its CUDA graph, with GELU -> BatchNorm unfused and fused, and a float16 run with
#          loss scaling against a bfloat16 one (OUT_DIR/pytest_gpu.txt).
#          GPU_TESTS=all adds the rest of the fast path's tests: the kernels in float32 at 10 other
#          shapes, both algorithms (odd and 1 x 1 planes, even and 1 x 1 kernels, planes wider than
#          32, batch 512 of 3 x 3 planes; each shape is a few more Triton compilations),
#          torch.compile of both kinds of kernel and of the model in the step's CUDA graph
#          (--compile --step-mode graph),
#          and the CPU-side augmentation tests (about 5 minutes on an H200 before the fused
#          GELU -> BatchNorm's tests and torch.compile's in a CUDA graph were added).
#   bench  python fast/benchmark.py for ConvMixer-256/8 k9 p1 at batch 64 and 512, eager, with
#          --fused-norm (fast paths only), and with --compile: each path's whole step, model only,
#          augmentation only, a profiled step, the 200-epoch recipe's estimated time, one depthwise
#          layer per algorithm (OUT_DIR/bench*/benchmark.json, console in bench.txt). BENCH_RUNS
#          names some of the three, e.g. BENCH_RUNS=bench_fused_norm (default: all of them).
#   short  a real CIFAR-10 run: ConvMixer-256/8 k5 p2, 25 epochs, batch 512, --fast $SHORT_FLAGS
#          (OUT_DIR/${SHORT_NAME:-short}), e.g. SHORT_FLAGS=--fused-norm SHORT_NAME=short_fused_norm;
#          the precision of older GPUs (float16, loss scaling, the plain path), forced on this one:
#          SHORT_FLAGS="--no-fast --amp-dtype float16" SHORT_NAME=short_float16
#   grid   the short recipe's trials (--recipe short), each on a hold-out of 5,000 training images
#          (--val 5000; the test set chooses nothing): GRID lists name:flags pairs (default below),
#          e.g. GRID="official: lr0.02:--lr=0.02,--wd=0.01"; each run into OUT_DIR/grid_NAME, its
#          console in grid_NAME.txt, and its val_acc printed: that, not the test accuracy, decides.
#   seeds  the chosen short recipe on all 50,000 training images, reported on the test set, once per
#          seed in SEEDS (default "0 1 2"): --recipe short $SEED_FLAGS into OUT_DIR/short_recipe_seedN.
#   sigterm  three --step-mode graph runs (synthetic images) sent SIGTERM 20, 25 and 30 s after their
#          start (SIGTERM_AFTER), each a few seconds into an epoch: every one must print both stop
#          lines ("stopping after this step", "stopped at epoch") and exit 143 (OUT_DIR/sigterm.txt).
#   main   the main job, train_cifar.py --hdim 256 --depth 8 --ksize 9 $MAIN_FLAGS, into
#          OUT_DIR/${RUN_NAME:-cifar10_convmixer_256_8_k9_p1} (console in its console.txt). A run
#          already there, or else committed under results/ with that name, is continued (--resume).
#          Then it prints the run's pieces (tools/run_pieces.py). With MAIN_SECONDS set, it is
#          stopped (SIGTERM) after that many seconds and saves last.pt: continue it with the same
#          command, from OUT_DIR or from the folder committed under results/. MAIN_FLAGS go to a
#          continued run too, where of the recipe's flags only --step-mode, --compile and
#          --fused-norm may differ from the run's own (a new run takes --fast's graph step; a
#          continued one keeps its own step mode unless MAIN_FLAGS names one, e.g. "--step-mode
#          graph"). A recipe trial: MAIN_FLAGS="--val 5000 ..." RUN_NAME=val_<what>.
#
# "tests" and "bench" use synthetic images; "short" and "main" need CIFAR-10 in ./data (downloaded
# there on first use). No GPU is needed to check that the kernels compile for an H100 (or, with
# --arch, another NVIDIA GPU): python fast/check_kernels.py.
set -uo pipefail
export PYTHONUNBUFFERED=1
[ $# -ge 1 ] || { echo "usage: bash tools/gpu_check.sh OUT_DIR [tests] [bench] [short] [grid] [seeds] [sigterm] [main]"; exit 2; }
out_dir=$1; shift
# folder:flags of each benchmark run (the fused GELU -> BatchNorm on its fast paths only),
# torch.compile's last: it compiles the model afresh for every path and batch size
bench_runs=("bench:" "bench_fused_norm:--fused-norm --paths fast fast_graph" "bench_compile:--compile")
chosen_bench=" ${BENCH_RUNS:-${bench_runs[*]%%:*}} "
for name in $chosen_bench; do                       # a misspelt name stops before any GPU work
    [[ " ${bench_runs[*]%%:*} " == *" $name "* ]] \
        || { echo "BENCH_RUNS: no run named $name (${bench_runs[*]%%:*})"; exit 2; }
done
mkdir -p "$out_dir" || exit 2
{ nvidia-smi -L; python -c "import torch, torchvision, triton; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'triton', triton.__version__)"; } >> "$out_dir/steps.txt" 2>&1
status=0
for step in "$@"; do
    start=$(date +%s)
    case "$step" in
    tests)
        selection="(fast_depthwise and not compiles_into_one_graph and not compile_for_an_h100 and not float32) or (matches_conv2d_float32 and 32-32-9) or batch_augment_on_cuda or (cuda_only and not torch_compile) or (test_fused_gelu_batchnorm and not compiles_into_one_graph)"
        [ "${GPU_TESTS:-}" = all ] && selection="fast_depthwise or depthwise_breakdown or gelu_batchnorm or batch_augment or batched or resized_crop or cuda_only"
        # -m "": slow tests too (pytest.ini's default leaves them out)
        timeout 900 python -m pytest -q -m "" -rs --durations=15 -k "$selection" \
            tests > "$out_dir/pytest_gpu.txt" 2>&1 || status=1 ;;
    bench)
        for run in "${bench_runs[@]}"; do
            [[ $chosen_bench == *" ${run%%:*} "* ]] || continue
            # shellcheck disable=SC2086  # the flags are a list
            timeout 400 python fast/benchmark.py --hdim 256 --depth 8 --ksize 9 --batch-sizes 64 512 \
                ${run#*:} --out "$out_dir/${run%%:*}" >> "$out_dir/bench.txt" 2>&1 || status=1
        done ;;
    short)
        short=${SHORT_NAME:-short}
        # shellcheck disable=SC2086  # SHORT_FLAGS is a list of flags
        python train_cifar.py --hdim 256 --depth 8 --ksize 5 --psize 2 --epochs 25 --batch-size 512 \
            --fast ${SHORT_FLAGS:-} --data data --out "$out_dir/$short" > "$out_dir/${short}_console.txt" 2>&1 \
            && rm -f "$out_dir/$short/last.pt" || status=1 ;;
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
    sigterm)
        for after in ${SIGTERM_AFTER:-20 25 30}; do
            timeout --preserve-status --signal=TERM --kill-after=60 "$after" python -X faulthandler \
                train_cifar.py --hdim 256 --depth 8 --ksize 9 --epochs 20 --fake-data 20000 --step-mode graph \
                --progress-every 1 --out "$out_dir/sigterm_$after" > "$out_dir/sigterm_$after.txt" 2>&1
            code=$?
            lines=$(grep -c "SIGTERM: stopping after this step\|SIGTERM: stopped at epoch" "$out_dir/sigterm_$after.txt")
            echo "sigterm after $after s: exit $code, $lines of the 2 stop lines" | tee -a "$out_dir/sigterm.txt"
            [ "$code" -eq 143 ] && [ "$lines" -eq 2 ] || status=1
            rm -rf "$out_dir/sigterm_$after"
        done ;;
    main)
        name=${RUN_NAME:-cifar10_convmixer_256_8_k9_p1}
        run="$out_dir/$name"
        if [ ! -e "$run" ] && [ -d "results/$name" ]; then   # continue the run committed here
            cp -r "results/$name" "$run" && echo "main: continuing results/$name in $run"
        fi
        if grep -qs '"final": true' "$run/log.jsonl"; then     # complete (stopped just after its end)
            rm -f "$run/last.pt"; echo "main: $run is complete"; continue
        fi
        # A new run gets the main job's model; a continued one has its recipe in last.pt.
        recipe=(--hdim 256 --depth 8 --ksize 9); [ -f "$run/log.jsonl" ] && recipe=(--resume)
        # With MAIN_SECONDS: SIGTERM then saves last.pt mid-epoch; should the process not end
        # within a minute more, SIGKILL (last.pt is written every --save-every minutes as well).
        limit=()
        [ -n "${MAIN_SECONDS:-}" ] && limit=(timeout --preserve-status --signal=TERM --kill-after=60 "$MAIN_SECONDS")
        # -X faulthandler: a crash (segfault, abort) leaves the Python stack of every thread.
        # shellcheck disable=SC2086  # MAIN_FLAGS is a list of flags
        "${limit[@]}" python -X faulthandler train_cifar.py "${recipe[@]}" ${MAIN_FLAGS:-} \
            --data data --out "$run" 2>&1 | tee "$out_dir/main_part.txt"
        code=${PIPESTATUS[0]}
        # How it ended: 0 complete; 143 SIGTERM (saved at once if "stopped at epoch" is printed just
        # above, else last.pt is from its last save); 137 SIGKILL; 139 or 134 a crash.
        echo "main: train_cifar.py exited with status $code, $(( $(date +%s) - start )) s into this step" \
            | tee -a "$out_dir/main_part.txt"
        # The run's console, one call after another, kept in its folder; then its pieces so far.
        [ -d "$run" ] && cat "$out_dir/main_part.txt" >> "$run/console.txt" && rm "$out_dir/main_part.txt"
        [ -f "$run/log.jsonl" ] && python tools/run_pieces.py "$run"
        if [ "$code" -eq 0 ]; then
            rm -f "$run/last.pt"
        else
            status=1
            python - "$run/last.pt" <<'EOF' 2>/dev/null
import sys, torch
s = torch.load(sys.argv[1], weights_only=True)
print(f"main: not finished; last.pt holds epoch {s['epoch'] + 1}, step {s['step']} of {s['recipe']['epochs']}"
      f" epochs: keep the run's folder with its last.pt to continue it")
EOF
        fi ;;
    *)
        echo "unknown step $step (tests, bench, short, grid, seeds, sigterm, main)"; exit 2 ;;
    esac
    echo "$step: $(( $(date +%s) - start )) s, status so far $status" | tee -a "$out_dir/steps.txt"
done
exit $status

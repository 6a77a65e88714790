"""Training throughput of the plain and the fast path, for one ConvMixer config, on synthetic data.

    python train_cifar.py --hdim 256 --depth 8 --ksize 9 --batch-size 512 --benchmark [--compile]

For each path: images per second for the whole step (data, mixing, forward, backward, AdamW) and
for the model alone (with and without the per-step host sync of the loss check); for the fast path
the augmentation alone; a torch.profiler table of the kernels (on a CPU, the operators) that take
the most time per step; on CUDA, one depthwise layer's milliseconds for PyTorch and each Triton
algorithm. Everything goes to --out/benchmark.json, written after each path, so a run cut short
keeps what it measured.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from fast.augment import AUGMENT_CHUNK_IMAGES
from train_cifar import (N_CLASSES, N_TRAIN_IMAGES, RECIPE_KEYS, EpochPlan, batch_mixing, device_name,
                         epoch_batches, make_optimizer, prepare_model, save_atomic, train_step,
                         training_data)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def depthwise_breakdown(args, device, amp, repeats=20):
    """Milliseconds for one depthwise layer of this config, nn.Conv2d vs each Triton algorithm
    ("toeplitz" with stacks of 32 rows, the default fast_depthwise.TOEPLITZ_ROWS, and 256):
    forward, and forward + backward (input and weight gradients)."""
    from fast import depthwise as fast_depthwise
    side = 32 // args.psize
    conv = nn.Conv2d(args.hdim, args.hdim, args.ksize, groups=args.hdim, padding="same").to(device)
    x = torch.randn(args.batch_size, args.hdim, side, side, device=device, requires_grad=True)
    timings = {}
    default_rows = fast_depthwise.TOEPLITZ_ROWS
    layers = [("native", conv, default_rows),
              ("triton_direct", fast_depthwise.FastDepthwiseConv2d(conv, "direct"), default_rows)]
    if side <= fast_depthwise.TOEPLITZ_MAX_WIDTH:
        layers += [(f"triton_toeplitz_{rows}rows", fast_depthwise.FastDepthwiseConv2d(conv, "toeplitz"), rows)
                   for rows in sorted({32, default_rows, 256})]

    def milliseconds(layer, part):
        def run():
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                y = layer(x)
            if part == "forward_backward":
                y.backward(torch.ones_like(y))
        run()
        synchronize(device)
        t = time.perf_counter()
        for _ in range(repeats):
            run()
        synchronize(device)
        return 1000 * (time.perf_counter() - t) / repeats

    try:
        for name, layer, rows in layers:
            fast_depthwise.TOEPLITZ_ROWS = rows          # read at each launch
            for part in ("forward", "forward_backward"):
                timings[f"{name}_{part}"] = milliseconds(layer, part)
    finally:
        fast_depthwise.TOEPLITZ_ROWS = default_rows
    print("one depthwise layer, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    return timings


def profile_steps(run_steps, step_range, device, label, top=12):
    """Where the time of a step goes, from torch.profiler over step_range: the `top` CUDA kernels
    (on a CPU: operators) by their own time, and the sum over all of them, in ms per step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    t = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        run_steps(step_range)
        synchronize(device)
    wall, n = time.perf_counter() - t, len(step_range)
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    rows = sorted(((e.key, (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total)
                    / 1000 / n) for e in prof.key_averages() if e.device_type == kind),
                  key=lambda row: -row[1])
    busy = sum(ms for _, ms in rows)
    print(f"{label} path, profile of {n} steps: {busy:.2f} ms busy of {1000 * wall / n:.2f} ms per step "
          f"(profiler on); top {'kernels' if device.type == 'cuda' else 'operators'}:")
    for name, ms in rows[:top]:
        print(f"    {ms:8.3f} ms  {100 * ms / max(busy, 1e-9):5.1f}%  {name[:100]}")
    return {"steps": n, "wall_ms_per_step": 1000 * wall / n, "busy_ms_per_step": busy,
            "top": [{"name": name[:200], "ms_per_step": ms} for name, ms in rows[:top]]}


def benchmark(args):
    """Training throughput of the plain and the fast path for one config, on synthetic data."""
    device = torch.device(args.device)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}_benchmark")
    warmup = 10 if args.compile else 3
    b = args.batch_size
    # The profile covers as many steps as --fast augments at a time (16 at batch 512), so that
    # it sees one augmentation call; at most --bench-steps.
    profiled = min(args.bench_steps, max(1, AUGMENT_CHUNK_IMAGES // b))
    steps = warmup + args.bench_steps + profiled
    amp = args.amp and device.type == "cuda"
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (steps * b, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, N_CLASSES, (steps * b,), generator=g)
    plan = EpochPlan(steps * b, b, args.seed, 0)

    def images_per_second(run_steps):
        """Time run_steps(n) for `warmup` then `bench_steps` steps; images per second."""
        run_steps(range(warmup))
        synchronize(device)
        t = time.perf_counter()
        run_steps(range(warmup, warmup + args.bench_steps))
        synchronize(device)
        return args.bench_steps * b / (time.perf_counter() - t)

    result = {"device": device_name(device), "torch": torch.__version__,
              "config": {"hdim": args.hdim, "depth": args.depth, "ksize": args.ksize,
                         "psize": args.psize, "batch_size": b, "amp": amp, "compile": args.compile,
                         "workers": args.workers}}
    out.mkdir(parents=True, exist_ok=True)

    def save():      # after each path: a run cut short by a time limit keeps what it measured
        save_atomic(json.dumps(result, indent=2) + "\n", out / "benchmark.json",
                    write=lambda text, path: path.write_text(text))

    for path in ("fast", "plain"):       # fast first: the number a cut-short run must not lose
        recipe = argparse.Namespace(**{k: getattr(args, k) for k in RECIPE_KEYS})
        recipe.fast, recipe.n_train = path == "fast", steps * b
        model, net = prepare_model(recipe, device)
        optimizer = make_optimizer(model, recipe)
        criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        mix = batch_mixing(recipe)
        data = training_data(recipe, images, labels, device)
        batches = iter(epoch_batches(recipe, plan, 0, data, args.workers, device))

        def whole_steps(step_range):                   # data, mixing, forward, backward, AdamW
            for step in step_range:
                x, y = next(batches)
                x, target = mix(x, y)
                train_step(net, optimizer, criterion, x, target, args.lr, amp, args.clip)

        fixed_x, fixed_y = mix(*next(iter(epoch_batches(recipe, plan, 0, data, 0, device))))

        def model_steps(step_range, check=True):       # the same batch again and again
            for _ in step_range:
                train_step(net, optimizer, criterion, fixed_x, fixed_y, args.lr, amp, args.clip, check)

        result[f"{path}_img_s"] = images_per_second(whole_steps)
        result[f"{path}_profile"] = profile_steps(whole_steps, range(steps - profiled, steps), device, path)
        result[f"{path}_model_only_img_s"] = images_per_second(model_steps)
        # Without the loss check's host sync the CPU can queue the next step while the GPU works.
        result[f"{path}_model_only_no_sync_img_s"] = images_per_second(lambda r: model_steps(r, False))
        if path == "fast":                              # its data path alone, as training runs it
            def augment_epoch():
                for _ in epoch_batches(recipe, plan, 0, data, 0, device):
                    pass

            augment_epoch()
            synchronize(device)
            t = time.perf_counter()
            augment_epoch()
            synchronize(device)
            result["fast_augment_only_img_s"] = plan.steps * b / (time.perf_counter() - t)
        print(f"{path:5s}: {result[f'{path}_img_s']:9,.0f} img/s whole step, "
              f"{result[f'{path}_model_only_img_s']:9,.0f} img/s model only "
              f"({result[f'{path}_model_only_no_sync_img_s']:,.0f} without the host sync)", flush=True)
        save()
    result["speedup"] = result["fast_img_s"] / result["plain_img_s"]
    print(f"fast/plain: {result['speedup']:.2f}x; augmentation alone (fast path): "
          f"{result['fast_augment_only_img_s']:,.0f} img/s on {result['device']}; an epoch of "
          f"CIFAR-10's {N_TRAIN_IMAGES:,} images: plain {N_TRAIN_IMAGES / result['plain_img_s']:.1f} s, "
          f"fast {N_TRAIN_IMAGES / result['fast_img_s']:.1f} s (training only)")
    if device.type == "cuda":
        result["depthwise_ms"] = depthwise_breakdown(args, device, amp)
    save()
    print(f"wrote {out / 'benchmark.json'}")
    return result
